"""Float64 reference of the region (block-diagonal) attention: one region at a time, plain softmax.

Conventions as :mod:`attnzoo.ops.masks`: q ``[1, Hq, T, D]``, k/v ``[1, Hkv, T, D]`` hold every region of a
batch packed one after another (``lengths`` their token counts, summing to ``T``); a token attends to the
tokens of its own region only (and, with ``causal``, to those not after it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["region_attention_reference"]


def region_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], *,
                               causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v within each region, in float64 -> ``[1, Hq, T, Dv]`` in q's dtype."""
    out_dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n]
        s = qs @ ks.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(s, -1) @ vs)
        start += n
    return torch.cat(outs, 2).to(out_dtype)
