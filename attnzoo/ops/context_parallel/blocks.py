"""One rank's work on one visiting K/V block: attention of its queries to those keys, forward and backward.

Queries and keys carry their *global* positions (a shard is one or two runs of positions, see
:mod:`.sharding`), so causal and band masks are the single-process ones, whatever the layout. The mask is a band
on ``d = j - i`` (key minus query position): ``lo <= d <= hi``, ``None`` for an open side (causal: ``hi = 0``;
a sliding window of ``w``: ``lo = -w``, ``hi = w``, or ``0`` when causal; dense bidirectional: no band). Each pair
of runs is cut into tiles of at most :data:`TILE` queries by :data:`KEY_TILE` keys; a tile the band keeps whole runs unmasked, a tile it
removes whole is skipped (causal: about half of them), others get the band as a mask.

The forward keeps a running output and log-sum-exp per query (the online softmax of FlashAttention, merged
across blocks); the backward recomputes each tile's probabilities from the final log-sum-exp, as FlashAttention's
backward does. The math is plain PyTorch matmuls in float32 (half inputs) or the input dtype (float32/float64):
the memory of a tile is ``TILE x KEY_TILE`` scores per head.
"""

from __future__ import annotations

import torch

__all__ = ["TILE", "KEY_TILE", "Band", "attend_block", "grad_block"]

#: Query rows and keys per tile: bound the score matrix one step materializes and set the granularity of skipping
#: (a sliding window's tiles outside the band, the causal upper triangle).
TILE = 512
KEY_TILE = 1024

Band = tuple  # (lo, hi): key - query position offsets kept, None = unbounded


def _relation(qa: int, qb: int, ka: int, kb: int, band: Band) -> str:
    lo, hi = band
    dmin, dmax = ka - (qb - 1), (kb - 1) - qa
    if (lo is not None and dmax < lo) or (hi is not None and dmin > hi):
        return "skip"
    if (lo is None or dmin >= lo) and (hi is None or dmax <= hi):
        return "full"
    return "partial"


def _keep(qa: int, qb: int, ka: int, kb: int, band: Band, device) -> torch.Tensor:
    d = torch.arange(ka, kb, device=device)[None, :] - torch.arange(qa, qb, device=device)[:, None]
    lo, hi = band
    keep = torch.ones_like(d, dtype=torch.bool)
    if lo is not None:
        keep &= d >= lo
    if hi is not None:
        keep &= d <= hi
    return keep


def _tiles(q_spans, k_spans, band: Band):
    """``(q_local_slice, k_local_slice, keep-or-None)`` for every tile that is not skipped. The spans are the
    ``(start, stop)`` position runs of the local query tensor and of the visiting key block, in their order."""
    q_off = 0
    for qa, qb in q_spans:
        for ta in range(qa, qb, TILE):
            tb = min(ta + TILE, qb)
            k_off = 0
            for ka, kb in k_spans:
                for ua in range(ka, kb, KEY_TILE):
                    ub = min(ua + KEY_TILE, kb)
                    rel = _relation(ta, tb, ua, ub, band)
                    if rel != "skip":
                        keep = None if rel == "full" else (ta, tb, ua, ub)
                        yield (slice(q_off + ta - qa, q_off + tb - qa), slice(k_off + ua - ka, k_off + ub - ka), keep)
                k_off += kb - ka
        q_off += qb - qa


def attend_block(q, k, v, q_spans, k_spans, band: Band, scale: float, out, lse) -> None:
    """Fold the visiting block into the running ``out`` / ``lse`` (in place).

    Shapes (compute dtype): ``q [B, Hkv, G, Nq, D]``, ``k [B, Hkv, 1, Nk, D]``, ``v [B, Hkv, 1, Nk, Dv]``,
    ``out [B, Hkv, G, Nq, Dv]`` (normalized so far), ``lse [B, Hkv, G, Nq]`` (-inf where nothing was seen)."""
    for qs, ks, keep in _tiles(q_spans, k_spans, band):
        s = torch.matmul(q[..., qs, :], k[..., ks, :].transpose(-1, -2)) * scale
        if keep is not None:
            s = s.masked_fill(~_keep(*keep, band, s.device), float("-inf"))
        m = s.amax(-1)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with nothing kept in this tile
        p = torch.exp(s - m[..., None])
        tile_lse = m + torch.log(p.sum(-1))
        o = torch.matmul(p, v[..., ks, :])  # unnormalized: o / sum(p) is the tile's output
        old = lse[..., qs]
        new = torch.logaddexp(old, tile_lse)
        new_safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
        out[..., qs, :] = (
            out[..., qs, :] * torch.exp(old - new_safe)[..., None] + o * torch.exp(m - new_safe)[..., None]
        )
        lse[..., qs] = new


def grad_block(q, k, v, do, lse, delta, q_spans, k_spans, band: Band, scale: float, dq, dk, dv) -> None:
    """Add the visiting block's part of the gradients: ``dq`` (this rank's queries) and ``dk``/``dv`` (the
    visiting block's keys, summed over the query groups). ``lse`` is the *final* log-sum-exp, ``delta`` is
    ``rowsum(dO * O)``; shapes as :func:`attend_block`, ``dk``/``dv`` ``[B, Hkv, Nk, D]``."""
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # rows that see nothing: p = 0 below
    for qs, ks, keep in _tiles(q_spans, k_spans, band):
        kt, vt, qt, dot = k[..., ks, :], v[..., ks, :], q[..., qs, :], do[..., qs, :]
        p = torch.exp(torch.matmul(qt, kt.transpose(-1, -2)) * scale - lse[..., qs, None])
        if keep is not None:
            p = p.masked_fill(~_keep(*keep, band, p.device), 0.0)
        dv[..., ks, :] += torch.matmul(p.transpose(-1, -2), dot).sum(2)
        ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - delta[..., qs, None])
        dq[..., qs, :] += torch.matmul(ds, kt) * scale
        dk[..., ks, :] += torch.matmul(ds.transpose(-1, -2), qt).sum(2) * scale
