"""Mean-pooling and repetition of KV heads (the GQA paper's conversion).

Ainslie et al., *GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints* (2023): to go from ``n`` KV heads to ``g`` groups, each new
key (value) head is the mean of the ``r = n/g`` consecutive old key (value) heads
of its group, weights and biases alike::

    W'_k[j] = (1/r) * sum_{i=0}^{r-1} W_k[j*r + i]        (same for W_v and the biases)

Consecutive pooling keeps Hugging Face's layout: query head ``h`` read old KV head
``h // (heads/n)`` and now reads ``h // (heads/g)``, the group that old head joined.
Query and output projections are unchanged. With ``r = 1`` nothing changes (lossless).

Going up (``g`` a multiple of ``n``, e.g. back to MHA) repeats each KV head ``g/n``
times, which is exact: every query head still reads the same keys and values.
"""
from __future__ import annotations

import torch

from .heads import AttnWeights

__all__ = ["pool_heads", "repeat_heads", "mean_pool", "repeat_kv"]


def pool_heads(t: torch.Tensor | None, kv_heads: int, groups: int, head_dim: int) -> torch.Tensor | None:
    """Mean of each run of ``kv_heads // groups`` consecutive heads of ``t`` (``[kv_heads*head_dim, ...]``),
    computed in float32 (float64 stays float64) and returned in ``t``'s dtype."""
    if t is None:
        return None
    r = kv_heads // groups
    rest = t.shape[1:]
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    heads = t.reshape(groups, r, head_dim, *rest)
    total = heads[:, 0].to(acc, copy=True)  # one accumulator the size of the output, not a float copy of t
    for i in range(1, r):
        total.add_(heads[:, i])
    return total.div_(r).to(t.dtype).reshape(groups * head_dim, *rest)


def repeat_heads(t: torch.Tensor | None, kv_heads: int, groups: int, head_dim: int) -> torch.Tensor | None:
    """Each head of ``t`` repeated ``groups // kv_heads`` times in place (exact)."""
    if t is None:
        return None
    r = groups // kv_heads
    rest = t.shape[1:]
    out = t.reshape(kv_heads, 1, head_dim, *rest).expand(kv_heads, r, head_dim, *rest)
    return out.reshape(groups * head_dim, *rest).clone()


def mean_pool(w: AttnWeights, groups: int) -> AttnWeights:
    """``method="mean"``: K and V heads (and biases) mean-pooled per group; Q and O unchanged."""
    n, hd = w.kv_heads, w.head_dim
    return w.replace(k=pool_heads(w.k, n, groups, hd), v=pool_heads(w.v, n, groups, hd),
                     k_bias=pool_heads(w.k_bias, n, groups, hd), v_bias=pool_heads(w.v_bias, n, groups, hd))


def repeat_kv(w: AttnWeights, groups: int) -> AttnWeights:
    """More KV heads than now (``groups`` a multiple of ``kv_heads``): repeat each, exactly."""
    n, hd = w.kv_heads, w.head_dim
    return w.replace(k=repeat_heads(w.k, n, groups, hd), v=repeat_heads(w.v, n, groups, hd),
                     k_bias=repeat_heads(w.k_bias, n, groups, hd), v_bias=repeat_heads(w.v_bias, n, groups, hd))
