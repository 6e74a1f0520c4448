"""The ``torch`` backend of the LSH op: chunk attention on the sorted rounds in plain PyTorch (any device,
autograd, float64), ``O(n x 2 bucket_size)`` memory per round: what Hugging Face's ``LSHSelfAttention`` computes,
without its length restriction. The Triton backend (:mod:`.triton_kernel`) computes the same without the sorted
copies: its kernels read the rows through the sort permutation."""
from __future__ import annotations

import torch

from .naive import SELF_SCORE

__all__ = ["chunk_attention", "SHARED", "SEPARATE"]

SHARED, SEPARATE = 1, 2  # how a query treats its own key: score it SELF_SCORE, or leave it out


def chunk_attention(qs, ks, vs, qpos, kpos, kkeep, *, chunk: int, causal: bool, self_mode: int, scale: float):
    """Attention within chunks of sorted rounds.

    Args:
        qs, ks, vs: ``[Z, n, d]`` queries/keys/values of ``Z`` (batch x head x round) rows in sorted order.
        qpos, kpos: int ``[Z, n]``: the original position of each sorted query/key.
        kkeep: bool ``[Z, n]`` (keys kept, padding dropped) or None.
        chunk: sorted query chunk ``c`` reads the key chunks ``c`` and ``c - 1`` (cyclically; once if one chunk).
        self_mode: :data:`SHARED` or :data:`SEPARATE` (see :mod:`.naive`).

    Returns:
        ``(o [Z, n, dv], lse [Z, n])``: each row's output and natural log-sum-exp (``-inf``: read nothing).
    """
    z, n, d = qs.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n

    def chunks(x, fill):
        if pad:
            x = torch.cat([x, x.new_full((z, pad, *x.shape[2:]), fill)], dim=1)
        return x.view(z, nc, chunk, *x.shape[2:])

    q, k, v = chunks(qs, 0), chunks(ks, 0), chunks(vs, 0)
    qp, kp = chunks(qpos, -1), chunks(kpos, -1)
    kk = chunks(kpos >= 0 if kkeep is None else kkeep, False)
    if nc > 1:  # each query chunk reads its own key chunk and the one before
        def back(x):
            return torch.cat([x, x.roll(1, dims=1)], dim=2)
        k, v, kp, kk = back(k), back(v), back(kp), back(kk)
    s = torch.einsum("zcid,zcjd->zcij", q, k)
    s = (s if s.dtype == torch.float64 else s.float()) * scale  # scores and log-sum-exp in float32 at least
    keep = kk[:, :, None, :] & (kp[:, :, None, :] >= 0)
    if causal:
        keep = keep & (kp[:, :, None, :] <= qp[:, :, :, None])
    own = kp[:, :, None, :] == qp[:, :, :, None]
    if self_mode == SHARED:
        s = torch.where(own, torch.full_like(s, SELF_SCORE), s)
    else:
        keep = keep & ~own
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m[..., None])  # 0 where masked (no NaN gradients for rows that read nothing)
    total = e.sum(dim=-1)
    some = total > 0
    lse = torch.where(some, m + torch.log(total.clamp_min(torch.finfo(total.dtype).tiny)), float("-inf"))
    p = e / torch.where(some, total, torch.ones_like(total))[..., None]
    o = torch.einsum("zcij,zcjd->zcid", p.to(v.dtype), v)
    return o.reshape(z, nc * chunk, -1)[:, :n], lse.reshape(z, nc * chunk)[:, :n]
