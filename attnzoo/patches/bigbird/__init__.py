"""``bigbird``: a block window, global blocks and seeded random blocks, for bidirectional encoders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import check_positive_int
from ...ops.sparse import BigBird
from ...options import option
from ...variants.sparse import BigBirdConfig, BigBirdOptions
from ..config import PatchConfig
from ..patterns import MAX_POSITIONS_HELP, PatternConverter
from ..position_table import position_tables

__all__ = ["BigBirdPatch", "BigBirdConverter", "bigbird"]


@dataclass(frozen=True, kw_only=True)
class BigBirdPatch(BigBirdOptions, PatchConfig):
    """``attnzoo.BigBird(block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0, max_positions=None)``."""

    variant: ClassVar[str] = "bigbird"
    max_positions: int | None = option(None, help=MAX_POSITIONS_HELP)

    def validate(self):
        check_positive_int("max_positions", self.max_positions, allow_none=True)


class BigBirdConverter(PatternConverter):
    """``patch(model, "bigbird", block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0,
    max_positions=None)``."""

    name = "bigbird"
    config_cls, module_config_cls, pattern_cls = BigBirdPatch, BigBirdConfig, BigBird
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
