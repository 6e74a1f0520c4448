"""The arguments of one sparse attention call, checked once and shared by every sparse backend."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ...errors import check_positive_int, check_type
from ..dense.call import AttentionCall
from .layout import DEFAULT_TILE, BlockLayout, compile_layout
from .naive import keep_rows
from .patterns import BoundPattern, Pattern, Rule

__all__ = ["SparseCall"]


@dataclass
class SparseCall:
    """Checked arguments of :func:`attnzoo.ops.sparse.sparse_attention` (conventions: :mod:`attnzoo.ops.masks`)."""

    dense: AttentionCall  # q, k, v, key_padding_mask, scale, dropout_p (no causal/mask: the pattern says)
    pattern: Pattern
    tile: int = DEFAULT_TILE
    global_rows: bool = True
    kernel_options: dict | None = None
    given_layout: BlockLayout | None = None  # a layout the caller built (per call: BlockLayout.from_rule)

    @classmethod
    def build(cls, q, k, v, pattern, *, key_padding_mask=None, scale=None, dropout_p=0.0, tile=None,
              global_rows=True, kernel_options=None):
        given = None
        if isinstance(pattern, BlockLayout):
            given, pattern = pattern, pattern.pattern.pattern
        elif not isinstance(pattern, Pattern):
            raise TypeError(f"pattern={pattern!r}: expected an attnzoo.ops.sparse Pattern, e.g. "
                            "make_pattern('sliding_window', window=256), or a BlockLayout")
        dense = AttentionCall.build(q, k, v, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p)
        if dense.q_len > dense.k_len:
            raise ValueError(f"q has {dense.q_len} positions and k {dense.k_len}: a sparse pattern attends within one "
                             "sequence, so q_len <= k_len (queries are the last q_len positions)")
        if given is not None:
            if tile is not None and tile != given.tile:
                raise ValueError(f"tile={tile}: the layout passed as pattern has tile={given.tile}; pass tile=None")
            if given.n != dense.k_len:
                raise ValueError(f"the layout passed as pattern covers {given.n} positions, k has {dense.k_len}")
            if given.partial_count.device != q.device:
                raise ValueError(f"the layout passed as pattern is on {given.partial_count.device}, q on {q.device}")
            tile = given.tile
        tile = pattern.default_tile() if tile is None else tile
        check_positive_int("tile", tile)
        check_type("global_rows", global_rows, bool, "True or False")
        if kernel_options is not None and not isinstance(kernel_options, dict):
            raise TypeError(f"kernel_options={kernel_options!r}: expected a dict of FlexAttention kernel options")
        return cls(dense, pattern, tile, global_rows, kernel_options, given)

    # ------------------------------------------------------------------ derived facts
    @property
    def q(self) -> torch.Tensor:
        return self.dense.q

    @property
    def k(self) -> torch.Tensor:
        return self.dense.k

    @property
    def v(self) -> torch.Tensor:
        return self.dense.v

    @property
    def self_attention(self) -> bool:
        """One sequence attending to itself (what the block-sparse kernels take); else decoding rows."""
        return self.dense.q_len == self.dense.k_len

    @cached_property
    def layout(self) -> BlockLayout:
        """The block layout: the caller's, else the cached one of the pattern (self-attention only)."""
        if self.given_layout is not None:
            return self.given_layout
        return compile_layout(self.pattern, self.dense.k_len, self.tile, self.q.device)

    @property
    def per_call(self) -> bool:
        """The pattern is a rule computed from this call's inputs (its layout is built per call)."""
        return isinstance(self.pattern, Rule)

    @cached_property
    def bound(self) -> BoundPattern:
        if self.self_attention or self.given_layout is not None:
            return self.layout.pattern
        return self.pattern.bind(self.dense.k_len, self.q.device)

    def keep_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Bool ``[len(rows), k_len]``: the pattern's keep mask for query positions ``rows`` (global rows
        keep nothing when ``global_rows=False``: the caller computes them)."""
        return keep_rows(self.bound, rows, self.global_rows)

    def query_positions(self) -> torch.Tensor:
        d = self.dense
        return torch.arange(d.k_len - d.q_len, d.k_len, device=self.q.device)

    def order_key(self) -> str:
        """Which priority list of :data:`~attnzoo.ops.sparse.op.SPARSE_ORDER` applies: ``"cuda:band"`` for band
        patterns on CUDA, else the device type."""
        dev = self.q.device.type
        return f"{dev}:band" if dev == "cuda" and self.pattern.band() is not None else dev

    def signature(self) -> tuple:
        """What the choice of backend may depend on (not the lengths; read straight from the tensors: it is
        built on every call)."""
        d = self.dense
        q, k = d.q, d.k
        pattern = self.pattern if type(self.pattern) is not Rule else (Rule, self.pattern.causal)  # rules: by kind
        return (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[3], d.v.shape[3], pattern, self.tile,
                q.shape[2] == k.shape[2], d.key_padding_mask is not None, d.dropout_p > 0, d.needs_grad)
