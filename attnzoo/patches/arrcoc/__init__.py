"""``patch(vlm, "arrcoc", budget=..., levels=...)``: ARR-COC's visual token budget on a LLaVA-style model.

The typed config :class:`Arrcoc` (``attnzoo.Arrcoc``) holds the variant's options (``budget``, ``levels``,
``grid``, ``temperature``: :class:`attnzoo.variants.arrcoc.ArrcocOptions`) and two of the plug-in's own
(``image_mean``, ``image_std``: the processor's normalisation, to read colours for the texture array). The
converter installs :class:`attnzoo.arrcoc.plugin.ArrcocPlugin` (docs/arrcoc.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...arrcoc.plugin import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ArrcocPlugin
from ...options import option
from ...variants.arrcoc import ArrcocOptions
from ..config import PatchConfig
from .model_level import ModelLevelConverter

__all__ = ["Arrcoc", "ArrcocConverter", "arrcoc", "ModelLevelConverter"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


@dataclass(frozen=True, kw_only=True)
class Arrcoc(ArrcocOptions, PatchConfig):
    """``attnzoo.Arrcoc(budget=192, levels=(16, 32, ..., 144))``: see :class:`ArrcocOptions`."""

    variant = "arrcoc"
    image_mean: tuple[float, float, float] = option(OPENAI_CLIP_MEAN, help="the processor's per-channel mean "
                                                    "(pixel_values = (rgb - mean) / std)", parse=_floats,
                                                    metavar="R,G,B")
    image_std: tuple[float, float, float] = option(OPENAI_CLIP_STD, help="the processor's per-channel std",
                                                   parse=_floats, metavar="R,G,B")

    def validate(self):
        self.check_arrcoc()
        for name in ("image_mean", "image_std"):
            v = tuple(getattr(self, name))
            if len(v) != 3 or any(not isinstance(x, (int, float)) for x in v) or (
                    name == "image_std" and min(v) <= 0):
                raise ValueError(f"{name}={v!r}: expected three numbers (R, G, B)"
                                 + (", all positive" if name == "image_std" else ""))
            object.__setattr__(self, name, v)


class ArrcocConverter(ModelLevelConverter):
    name = "arrcoc"
    config_cls = Arrcoc

    def install(self, model, config: Arrcoc):
        return ArrcocPlugin(model, budget=config.budget, levels=config.levels, grid=config.grid,
                            temperature=config.temperature, image_mean=config.image_mean,
                            image_std=config.image_std).install()

    def note(self, config, full_tokens: int) -> str:
        return (f"visual tokens per image: {full_tokens} -> {config.budget} ({config.grid}x{config.grid} regions, "
                "each at the level its relevance earns)")


arrcoc = ArrcocConverter()
