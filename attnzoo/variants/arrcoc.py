"""ARR-COC's registry entries: ``arrcoc`` (query-aware token budget per image region, each region encoded at its
own level of detail) and its FastV-style baseline ``visual_topk``.

Neither changes what an attention layer *is*: they change *which visual tokens* a vision-language model's
language model sees. What each entry holds, and why:

* the options (:class:`ArrcocOptions`, :class:`VisualTopKOptions`), declared once here and shared by the module
  config, the typed patch config (``attnzoo.Arrcoc``, ``attnzoo.VisualTopK``) and ``attnzoo list``;
* the module: ``arrcoc``'s is :class:`RegionAttention`, dense attention that, given the region lengths of a
  packed sequence, attends within each region only (the vision tower's attention during ARR-COC's
  level-of-detail encoding, :func:`attnzoo.ops.regions.region_attention`); without regions it is the dense
  attention of the layer it came from. ``visual_topk``'s is the plain dense module (it prunes tokens, it does not
  change attention);
* the KV layout: the dense one of the layer (K/V heads x head_dim per token). ARR-COC and visual_topk save KV
  memory by caching *fewer visual tokens* (``budget``/``k`` instead of the tower's full count), not fewer bytes
  per token, so the per-token layout is unchanged and ``PatchReport``'s per-token numbers stay equal; the
  saving shows in ``generate()``'s peak memory (``attnzoo bench --variants arrcoc``);
* the converter (``attnzoo.patches.arrcoc``): a model-level plug-in on ``LlavaForConditionalGeneration``; no
  weight changes, so nothing to convert on disk (``attnzoo convert --to arrcoc`` says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

from ..errors import check_positive_int, check_type
from ..options import REQUIRED, option
from ..ops import apply_rope, rope_cos_sin
from ..ops.regions import region_attention
from ..registry import register
from .dense import DenseAttention, DenseConfig

__all__ = ["DEFAULT_LEVELS", "SQUARE_LEVELS", "ArrcocOptions", "ArrcocConfig", "VisualTopKOptions",
           "VisualTopKConfig", "RegionAttention", "VisualTopKAttention", "resolve_levels", "check_budget", "level_step"]

#: The seed's 16-aligned levels: every multiple of 16 from 64 (8 x 8) to 400 (20 x 20) tokens per region.
DEFAULT_LEVELS: tuple[int, ...] = tuple(range(64, 401, 16))
#: The seed's square levels 8², 12², 16², 20².
SQUARE_LEVELS: tuple[int, ...] = (64, 144, 256, 400)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)


def resolve_levels(levels) -> tuple[int, ...]:
    """``levels`` checked and as a tuple (None: :data:`DEFAULT_LEVELS`): strictly increasing positive ints."""
    if levels is None:
        return DEFAULT_LEVELS
    if isinstance(levels, str):
        levels = _int_tuple(levels)
    check_type("levels", levels, (tuple, list), "a strictly increasing tuple of positive ints, e.g. (64, 144, 256)")
    levels = tuple(levels)
    if not levels or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in levels) \
            or any(a >= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels={levels!r}: expected a non-empty, strictly increasing tuple of positive ints "
                         f"(tokens per region), e.g. {SQUARE_LEVELS} or None for every multiple of 16 from 64 to 400")
    return levels


def level_step(levels: tuple[int, ...]) -> int:
    """The step every total of these levels is a multiple of: their greatest common divisor (16 for the seed's)."""
    return reduce(math.gcd, levels)


def check_budget(budget, levels: tuple[int, ...], regions: int | None = None) -> None:
    """Raise unless ``budget`` is a positive multiple of the levels' step and, when ``regions`` is known, between
    ``regions x min(levels)`` and ``regions x max(levels)`` (each region gets one level)."""
    check_positive_int("budget", budget)
    step = level_step(levels)
    if budget % step:
        lo, hi = budget - budget % step, budget - budget % step + step
        raise ValueError(f"budget={budget}: must be a multiple of {step} (every total of levels={_short(levels)} "
                         f"is); nearest valid budgets: {', '.join(str(b) for b in (lo, hi) if b > 0)}")
    if regions is None:
        return
    lo, hi = regions * levels[0], regions * levels[-1]
    if not lo <= budget <= hi:
        raise ValueError(f"budget={budget} is infeasible for {regions} regions with levels={_short(levels)}: each "
                         f"region gets between {levels[0]} and {levels[-1]} tokens, so the budget must be a multiple "
                         f"of {step} from {lo} to {hi} (or change grid/levels)")


def _short(levels: tuple[int, ...]) -> str:
    if levels == DEFAULT_LEVELS:
        return "(64, 80, ..., 400)"
    return repr(levels)


@dataclass(frozen=True, kw_only=True)
class ArrcocOptions:
    """ARR-COC's options (shared by the module config and ``attnzoo.Arrcoc``, the typed patch config)."""

    budget: int = option(REQUIRED, help="visual tokens per image the language model sees (exactly, with the "
                                        "default levels; the closest total not above it otherwise)")
    levels: tuple[int, ...] | None = option(None, help="tokens a region may get, increasing (None: every multiple "
                                                       "of 16 from 64 to 400)", parse=_int_tuple, metavar="T,T,...")
    grid: int = option(2, help="regions per side: the image is cut into grid x grid regions")
    temperature: float = option(0.1, help="softmax temperature turning relevance into budget shares (small: "
                                          "winner takes most; large: even split)")

    def check_arrcoc(self) -> None:
        object.__setattr__(self, "levels", resolve_levels(self.levels))
        check_positive_int("grid", self.grid)
        check_type("temperature", self.temperature, (int, float), "a positive float")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: expected a positive float")
        check_budget(self.budget, self.levels, self.grid * self.grid)


@dataclass(frozen=True, kw_only=True)
class VisualTopKOptions:
    """``visual_topk``'s options (FastV-style pruning by the text's attention)."""

    k: int = option(REQUIRED, help="visual tokens per image kept (those the text attends to most)")
    layer: int = option(2, help="language-model layer whose attention ranks the visual tokens (0-based)")

    def check_topk(self) -> None:
        check_positive_int("k", self.k)
        check_positive_int("layer", self.layer, minimum=0)


@dataclass(frozen=True, kw_only=True)
class ArrcocConfig(ArrcocOptions, DenseConfig):
    """``arrcoc``'s module config: the dense options of the vision tower's attention and ARR-COC's own."""

    def validate(self):
        self.check_arrcoc()
        super().validate()


@dataclass(frozen=True, kw_only=True)
class VisualTopKConfig(VisualTopKOptions, DenseConfig):
    """``visual_topk``'s module config: the dense options and the pruning's."""

    def validate(self):
        self.check_topk()
        super().validate()


@register("arrcoc", ArrcocConfig, converter="attnzoo.patches.arrcoc:arrcoc",
          example={"dim": 64, "heads": 4, "budget": 256},
          description="ARR-COC: query-aware visual token budget per image region, each region at its own "
                      "level of detail (VLMs)")
class RegionAttention(DenseAttention):
    """Dense attention within the regions of a packed sequence (ARR-COC's level-of-detail encoding).

    ``forward(hidden_states, regions=[n0, n1, ...])`` takes ``hidden_states [1, T, dim]`` holding regions of
    ``n0, n1, ...`` tokens one after another and attends within each (:func:`attnzoo.ops.regions.region_attention`;
    RoPE positions restart at 0 in each region). Without ``regions`` it is :class:`DenseAttention`.
    """

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                regions=None, **kwargs) -> torch.Tensor:
        if regions is None:
            return super().forward(hidden_states, context, **kwargs)
        if context is not None or kwargs.get("cache") is not None or kwargs.get("attn_mask") is not None \
                or kwargs.get("key_padding_mask") is not None:
            raise ValueError("regions= packs whole regions into one sequence: it takes no context, cache, attn_mask "
                             "or key_padding_mask (a region's tokens are all real)")
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: with regions= expected a packed "
                             "[1, tokens, dim]")
        lengths = [int(n) for n in regions]
        n = hidden_states.shape[1]
        c = self.config
        q = self.q_proj(hidden_states).view(1, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self._kv(hidden_states, 1)
        if self.inv_freq is not None:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.cat([torch.arange(m, device=q.device) for m in lengths])
            cos, sin = rope_cos_sin(pos, self.inv_freq, c.rope.style)
            q, k = apply_rope(q, cos, sin, c.rope.style), apply_rope(k, cos, sin, c.rope.style)
        out = region_attention(q, k, v, lengths, causal=c.causal)
        return self.o_proj(out.transpose(1, 2).reshape(1, n, self.heads * self.head_dim))


@register("visual_topk", VisualTopKConfig, converter="attnzoo.patches.visual_topk:visual_topk",
          example={"dim": 64, "heads": 4, "k": 64},
          description="FastV-style baseline for arrcoc: keep the k visual tokens the text attends to most (VLMs)")
class VisualTopKAttention(DenseAttention):
    """Dense attention: ``visual_topk`` prunes visual tokens; the attention itself stays as it is."""
