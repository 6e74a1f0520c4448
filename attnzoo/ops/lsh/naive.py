"""The float64 reference of the LSH op (the test oracle): every (query, key) pair of every round judged on its
own, ``O(n^2)`` per round, no sorting tricks beyond the ranks.

Given the buckets of one round, sort the queries and the keys by (bucket, position) (shared-QK: one order; padded
tokens after every real one, whatever their buckets, so padding never moves a real token's chunk), cut
both orders into chunks of ``bucket_size``: the query of sorted rank ``r`` reads the keys of sorted ranks in its
chunk ``r // bucket_size`` and the one before (cyclically, within the round; a round of one chunk reads it once).
Then causality (key position <= query position), key padding, and the query's own key: shared-QK scores it
:data:`SELF_SCORE` (the token reads itself only when nothing else is there, as the paper); separate-QK leaves it
out of the chunks and adds it as one more term weighted as ``num_hashes`` copies (as if every round read it: every
query reads its own key, and with one bucket the result is exact attention). Each round gives
an output and its log-sum-exp; the rounds (and the own-key term) are combined by their log-sum-exp, i.e. one
softmax over everything the rounds read (a key read by two rounds counts twice, as in the paper and in Hugging
Face's ``LSHSelfAttention``). A query that reads nothing gives 0.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SELF_SCORE", "lsh_attention_reference", "round_keep", "padded_last"]

SELF_SCORE = -1e5  # a shared-QK token's score for itself (Hugging Face's self_mask_value_float32)


def padded_last(buckets: torch.Tensor, key_padding_mask) -> torch.Tensor:
    """``buckets [..., n]`` with the padded positions (``key_padding_mask [batch, n]`` False) in a bucket after
    every real one (``buckets`` is ``[batch, heads, rounds, n]``)."""
    if key_padding_mask is None:
        return buckets
    pad = ~key_padding_mask.bool()[:, None, None, :].to(buckets.device)
    return torch.where(pad, torch.full_like(buckets, 1 << 30), buckets)


def _ranks(buckets: torch.Tensor) -> torch.Tensor:
    """Sorted rank of each position when sorting by (bucket, position)."""
    perm = torch.sort(buckets, stable=True).indices
    ranks = torch.empty_like(perm)
    ranks[perm] = torch.arange(len(perm))
    return ranks


def round_keep(q_buckets: torch.Tensor, k_buckets: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """Bool ``[n, n]``: the (query, key) pairs one round's chunks hold (before causality, padding, own key)."""
    n = len(q_buckets)
    cq = _ranks(q_buckets) // bucket_size
    ck = _ranks(k_buckets) // bucket_size
    nc = -(-n // bucket_size)
    keep = ck[None, :] == cq[:, None]
    if nc > 1:
        keep |= ck[None, :] == (cq[:, None] - 1) % nc
    return keep


def lsh_attention_reference(q, k, v, q_buckets, k_buckets=None, *, bucket_size: int, causal: bool = False,
                            key_padding_mask=None, scale: float | None = None) -> torch.Tensor:
    """``[batch, heads, n, dv]`` in float64.

    Args:
        q, k, v: ``[batch, heads, n, d]`` (k/v may have fewer heads, grouped as :func:`attnzoo.ops.attention`).
        q_buckets: int ``[batch, heads, rounds, n]``; ``k_buckets``: the keys' (None: shared-QK, the queries').
        key_padding_mask: bool ``[batch, n]``, True = real token.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    g = h // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    shared = k_buckets is None
    rounds = q_buckets.shape[2]
    q_buckets = padded_last(q_buckets, key_padding_mask)
    k_buckets = None if shared else padded_last(k_buckets, key_padding_mask)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.bool)
    pos = torch.arange(n)
    for bi in range(b):
        kpm = torch.ones(n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[bi].bool().cpu()
        for hi in range(h):
            s = q[bi, hi] @ k[bi, hi // g].T * scale
            lses, outs = [], []
            for r in range(rounds):
                qb = q_buckets[bi, hi, r].cpu()
                kb = qb if shared else k_buckets[bi, hi // g if k_buckets.shape[1] != h else hi, r].cpu()
                keep = round_keep(qb, kb, bucket_size) & kpm[None, :]
                if causal:
                    keep &= pos[None, :] <= pos[:, None]
                sr = s.clone()
                if shared:
                    sr = torch.where(eye, torch.full_like(sr, SELF_SCORE), sr)
                else:
                    keep &= ~eye
                sr = sr.masked_fill(~keep, float("-inf"))
                lse = torch.logsumexp(sr, dim=-1)
                p = torch.nan_to_num(torch.exp(sr - lse[:, None]), nan=0.0)
                lses.append(lse)
                outs.append(p @ v[bi, hi // g])
            if not shared:  # the own key, as if every round read it
                own = s.diagonal() + math.log(rounds)
                lses.append(torch.where(kpm, own, torch.tensor(float("-inf"), dtype=torch.float64)))
                outs.append(v[bi, hi // g])
            lse = torch.stack(lses)  # [rounds(+1), n]
            w = torch.nan_to_num(torch.softmax(lse, dim=0), nan=0.0)
            out[bi, hi] = (w[..., None] * torch.stack(outs)).sum(0)
    return out
