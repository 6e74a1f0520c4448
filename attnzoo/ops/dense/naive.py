"""Eager reference attention: plain PyTorch, runs anywhere, the test oracle in float64.

It materializes the full score matrix (and repeats K/V for grouped heads); it is
written for clarity, not speed. Conventions: :mod:`attnzoo.ops.masks`.
"""
from __future__ import annotations

import math

import torch

from ..masks import combine_masks

__all__ = ["attention_reference"]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                        scale: float | None = None, dropout_p: float = 0.0,
                        compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v.

    Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` →
    ``[B, Hq, Nq, Dv]`` in q's dtype. ``compute_dtype`` (default: float32 for half
    types, else the input dtype) is the dtype the math runs in. Fully masked rows give 0.
    """
    out_dtype = q.dtype
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = combine_masks(q.shape[2], k.shape[2], causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                         device=q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:  # rows with nothing to attend to: 0 instead of NaN
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v).to(out_dtype)
