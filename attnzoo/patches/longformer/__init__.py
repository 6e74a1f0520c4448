"""``longformer``: a sliding window plus global tokens, for bidirectional encoders (the Longformer recipe:
the learned position table extended by copying, optional global projections)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import check_positive_int, check_type
from ...ops.sparse import Longformer
from ...options import option
from ...variants.sparse import LongformerConfig, LongformerOptions
from ..config import PatchConfig
from ..patterns import MAX_POSITIONS_HELP, PatternConverter

__all__ = ["LongformerPatch", "LongformerConverter", "longformer"]


@dataclass(frozen=True, kw_only=True)
class LongformerPatch(LongformerOptions, PatchConfig):
    """``attnzoo.Longformer(window=256, global_tokens=1, max_positions=None, global_projections=False)``."""

    variant: ClassVar[str] = "longformer"
    max_positions: int | None = option(None, help=MAX_POSITIONS_HELP)

    def validate(self):
        check_type("global_projections", self.global_projections, bool, "True or False")
        check_positive_int("max_positions", self.max_positions, allow_none=True)


class LongformerConverter(PatternConverter):
    """``patch(model, "longformer", window=W, global_tokens=1, max_positions=None, global_projections=False)``."""

    name = "longformer"
    config_cls, module_config_cls, pattern_cls = LongformerPatch, LongformerConfig, Longformer
    bidirectional_only = True

    def module_options(self, opts):
        return {**super().module_options(opts), "global_projections": opts["global_projections"]}


longformer = LongformerConverter()
