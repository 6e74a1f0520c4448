"""``patch(vlm, "visual_topk", k=..., layer=...)``: the FastV-style baseline of ARR-COC on a LLaVA-style model
(:class:`attnzoo.arrcoc.plugin.VisualTopKPlugin`): keep the ``k`` visual tokens per image the prompt's text
attends to most in language-model layer ``layer``."""
from __future__ import annotations

from dataclasses import dataclass

from ...arrcoc.plugin import VisualTopKPlugin
from ...variants.arrcoc import VisualTopKOptions
from ..arrcoc.model_level import ModelLevelConverter
from ..config import PatchConfig

__all__ = ["VisualTopK", "VisualTopKConverter", "visual_topk"]


@dataclass(frozen=True, kw_only=True)
class VisualTopK(VisualTopKOptions, PatchConfig):
    """``attnzoo.VisualTopK(k=192, layer=2)``: see :class:`VisualTopKOptions`."""

    variant = "visual_topk"

    def validate(self):
        self.check_topk()


class VisualTopKConverter(ModelLevelConverter):
    name = "visual_topk"
    config_cls = VisualTopK

    def install(self, model, config: VisualTopK):
        return VisualTopKPlugin(model, k=config.k, layer=config.layer).install()

    def note(self, config, full_tokens: int) -> str:
        return (f"visual tokens per image: {full_tokens} -> {config.k} (top-k by the text's attention in layer "
                f"{config.layer})")


visual_topk = VisualTopKConverter()
