"""``longformer``: a sliding window plus global tokens, for bidirectional encoders (the Longformer recipe:
the learned position table extended by copying, optional global projections)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import check_type
from ...ops import sparse as patterns
from ...variants.sparse import LongformerConfig, LongformerOptions
from ..patterns import PatternConverter, PositionsPatch

__all__ = ["Longformer", "LongformerConverter", "longformer"]


@dataclass(frozen=True, kw_only=True)
class Longformer(LongformerOptions, PositionsPatch):
    """``attnzoo.Longformer(window=256, global_tokens=1, max_positions=None, global_projections=False)``."""

    variant: ClassVar[str] = "longformer"

    def validate(self):
        check_type("global_projections", self.global_projections, bool, "True or False")
        super().validate()


class LongformerConverter(PatternConverter):
    """``patch(model, "longformer", window=W, global_tokens=1, max_positions=None, global_projections=False)``."""

    name = "longformer"
    config_cls, module_config_cls, pattern_cls = Longformer, LongformerConfig, patterns.Longformer
    bidirectional_only = True

    def module_options(self, opts):
        return {**super().module_options(opts), "global_projections": opts["global_projections"]}


longformer = LongformerConverter()
