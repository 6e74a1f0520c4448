"""``bigbird``: a block window, global blocks and seeded random blocks, for bidirectional encoders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...ops import sparse as patterns
from ...variants.sparse import BigBirdConfig, BigBirdOptions
from ..patterns import PatternConverter, PositionsPatch
from ..position_table import position_tables

__all__ = ["BigBird", "BigBirdConverter", "bigbird"]


@dataclass(frozen=True, kw_only=True)
class BigBird(BigBirdOptions, PositionsPatch):
    """``attnzoo.BigBird(block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0, max_positions=None)``."""

    variant: ClassVar[str] = "bigbird"


class BigBirdConverter(PatternConverter):
    """``patch(model, "bigbird", block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0,
    max_positions=None)``."""

    name = "bigbird"
    config_cls, module_config_cls, pattern_cls = BigBird, BigBirdConfig, patterns.BigBird
    bidirectional_only = True

    def check(self, adapter, config, opts):
        opts = super().check(adapter, config, opts)
        opts["window"] = self.pattern(opts, causal=False).window  # None -> block_size
        return opts

    def prepare(self, model, adapter, sites, opts, native):
        opts = super().prepare(model, adapter, sites, opts, native)
        n = opts.get("max_positions")
        if n is None and adapter.positions:
            n = position_tables(model, adapter)[0].capacity
        if n is not None:
            where = "max_positions" if opts.get("max_positions") is not None else "the model's positions"
            try:
                self.pattern(opts, causal=False).check(n)
            except ValueError as e:
                raise ValueError(f"{e} [checked at {where} = {n} tokens, the longest input this model takes]") from None
        return opts


bigbird = BigBirdConverter()
