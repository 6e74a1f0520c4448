"""One attention layer's projections as plain tensors, and the checks on head counts.

Everything in :mod:`attnzoo.conversion` works on :class:`AttnWeights`: the query, key,
value and output projections of one layer in ``nn.Linear`` convention (weight
``[out_features, in_features]``), heads contiguous along the output dimension, the
layout of Hugging Face's ``num_key_value_heads`` models: query head ``h`` reads KV head
``h // (heads // kv_heads)``. Fused layouts (``qkv_proj``, GPT-NeoX's per-head
interleaving, GPT-2's transposed ``Conv1D``) are converted to this form by
:mod:`attnzoo.conversion.layouts` before any mathematics happens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import check_positive_int

__all__ = ["AttnWeights", "RopeSpec", "valid_groups", "check_groups"]


@dataclass(frozen=True)
class RopeSpec:
    """Which head dims are rotated: the first ``rotary_dim`` dims in ``style`` ``"half"``
    (dim ``i`` pairs with ``i + rotary_dim/2``) or ``"interleaved"`` (``2i`` with ``2i+1``).
    ``rotary_dim=0`` means no RoPE (absolute or learned positions)."""

    rotary_dim: int = 0
    style: str = "half"

    def pairs(self) -> tuple[list[int], list[int]]:
        """Indices ``(a, b)`` of the rotated pairs inside one head."""
        half = self.rotary_dim // 2
        if self.style == "half":
            return list(range(half)), list(range(half, self.rotary_dim))
        return list(range(0, self.rotary_dim, 2)), list(range(1, self.rotary_dim, 2))


NO_ROPE = RopeSpec()


@dataclass(frozen=True)
class AttnWeights:
    """Projections of one attention layer (``nn.Linear`` convention, heads contiguous).

    ``q``: ``[heads*head_dim, dim]``; ``k``, ``v``: ``[kv_heads*head_dim, dim]``;
    ``o``: ``[dim_out, heads*head_dim]`` or None when a method does not need it.
    Biases are ``[rows]`` or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor | None
    heads: int
    head_dim: int
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None

    def __post_init__(self):
        hd = self.head_dim
        if self.q.shape[0] != self.heads * hd:
            raise ValueError(f"q has {self.q.shape[0]} rows: expected heads*head_dim = {self.heads}*{hd}")
        if self.k.shape[0] % hd or self.k.shape != self.v.shape:
            raise ValueError(f"k {tuple(self.k.shape)} and v {tuple(self.v.shape)}: expected equal shapes "
                             f"[kv_heads*{hd}, dim]")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads are not a multiple of {self.kv_heads} KV heads")

    @property
    def kv_heads(self) -> int:
        return self.k.shape[0] // self.head_dim

    def replace(self, **changes) -> AttnWeights:
        return dataclasses.replace(self, **changes)


def valid_groups(heads: int, kv_heads: int) -> list[int]:
    """Group counts reachable from ``kv_heads`` KV heads: divisors of ``heads`` that either
    divide ``kv_heads`` (whole KV heads are pooled) or are multiples of it (heads are repeated)."""
    return [g for g in range(1, heads + 1) if heads % g == 0 and (kv_heads % g == 0 or g % kv_heads == 0)]


def check_groups(groups, heads: int, kv_heads: int, where: str = "") -> int:
    """Validate ``groups`` (the KV heads to leave) for a layer with ``heads``/``kv_heads``."""
    check_positive_int("groups", groups)
    at = f" of {where}" if where else ""
    if heads % groups:
        raise ValueError(f"groups={groups}: must divide the {heads} query heads{at}; "
                         f"valid groups: {valid_groups(heads, kv_heads)}")
    if kv_heads % groups and groups % kv_heads:
        raise ValueError(f"groups={groups}: the layer{at} has {kv_heads} KV heads, and a conversion pools whole "
                         f"KV heads (or repeats them), so groups must divide {kv_heads} or be a multiple of it; "
                         f"valid groups: {valid_groups(heads, kv_heads)}")
    return groups
