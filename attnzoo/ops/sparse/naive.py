"""The sparse op's reference: the pattern's dense keep mask through the dense reference.

Plain PyTorch, runs anywhere, the test oracle in float64 (the ``reference`` backend of
:func:`attnzoo.ops.sparse_attention`). It materializes the ``q_len x k_len`` keep mask and score matrix, so it is
written for clarity, not speed. Queries are the *last* ``q_len`` positions of the sequence (decoding: fewer queries
than keys). Conventions: :mod:`attnzoo.ops.masks`.
"""
from __future__ import annotations

import torch

from ..dense.naive import attention_reference
from .patterns import BoundPattern, Pattern

__all__ = ["sparse_attention_reference", "keep_rows"]


def keep_rows(bound: BoundPattern, rows: torch.Tensor, global_rows: bool = True) -> torch.Tensor:
    """Bool ``[len(rows), n]``: the keep mask of ``bound`` for query positions ``rows``. With
    ``global_rows=False`` the rows of global tokens keep nothing (a caller computes them itself)."""
    j = torch.arange(bound.n, device=rows.device)
    fn = bound.keep if global_rows else bound.kernel_keep
    return fn(rows[:, None], j[None, :]).expand(len(rows), bound.n)


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *,
                               key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                               dropout_p: float = 0.0, global_rows: bool = True,
                               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + keep) v`` with the keep mask of ``pattern`` (a :class:`Pattern`, a
    :class:`BoundPattern` of length ``k_len``, or a :class:`~attnzoo.ops.sparse.layout.BlockLayout`, whose rule is
    used). Shapes as :func:`attnzoo.ops.attention`; ``q_len <= k_len``. Fully masked rows give 0."""
    n, nq = k.shape[2], q.shape[2]
    if isinstance(pattern, Pattern):
        bound = pattern.bind(n, q.device)
    elif isinstance(pattern, BoundPattern):
        bound = pattern
    else:  # a BlockLayout
        bound = pattern.pattern
    keep = keep_rows(bound, torch.arange(n - nq, n, device=q.device), global_rows)
    return attention_reference(q, k, v, mask=keep[None, None], key_padding_mask=key_padding_mask, scale=scale,
                               dropout_p=dropout_p, compute_dtype=compute_dtype)
