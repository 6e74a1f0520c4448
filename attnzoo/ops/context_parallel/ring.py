"""Ring attention (Liu et al. 2023): K/V blocks travel around the ranks while each rank attends its queries.

Forward: ``world`` steps; at step ``s`` rank ``r`` holds the K/V block of rank ``r - s`` and already sends it on to
``r + 1`` (receiving the next from ``r - 1``) while it computes, so communication overlaps compute. Partial
results merge by log-sum-exp (:func:`.blocks.attend_block`). Backward, the reverse ring: the K/V blocks go round
again, each carrying the gradient of its keys and values accumulated by the ranks it visited; after the last step
one more hop brings each accumulated ``dK``/``dV`` home. Queries never move; ``dQ`` stays local.
"""

from __future__ import annotations

import math

import torch

from .blocks import Band, attend_block, grad_block
from .comm import Ring
from .sharding import Sharding

__all__ = ["ring_attention_local"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grouped(q: torch.Tensor, kv_heads: int, dtype) -> torch.Tensor:
    b, hq, n, d = q.shape
    return q.to(dtype).reshape(b, kv_heads, hq // kv_heads, n, d)


def _forward(q, k, v, sharding: Sharding, band: Band, scale: float, ring: Ring):
    b, hkv, _, _ = k.shape
    cd = _compute_dtype(q.dtype)
    qc = _grouped(q, hkv, cd)
    out = torch.zeros(*qc.shape[:-1], v.shape[-1], dtype=cd, device=q.device)
    lse = torch.full(qc.shape[:-1], float("-inf"), dtype=cd, device=q.device)
    q_spans = sharding.spans(ring.rank)
    kb, vb = k.contiguous(), v.contiguous()
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sharding.length((ring.rank - step - 1) % ring.world)
            recv = [k.new_empty(b, hkv, n, k.shape[-1]), v.new_empty(b, hkv, n, v.shape[-1])]
            pending = ring.exchange([kb, vb], recv)
        src = (ring.rank - step) % ring.world
        attend_block(
            qc, kb.to(cd).unsqueeze(2), vb.to(cd).unsqueeze(2), q_spans, sharding.spans(src), band, scale, out, lse
        )
        if pending is not None:
            Ring.wait(pending)
            kb, vb = recv
    return out, lse


def _backward(q, k, v, out, lse, grad_out, sharding: Sharding, band: Band, scale: float, ring: Ring):
    b, hkv, nk, _ = k.shape
    cd = out.dtype
    qc = _grouped(q, hkv, cd)
    do = _grouped(grad_out, hkv, cd)
    delta = (do * out).sum(-1)
    dq = torch.zeros_like(qc)
    q_spans = sharding.spans(ring.rank)
    kb, vb = k.contiguous(), v.contiguous()
    dk = torch.zeros(b, hkv, nk, k.shape[-1], dtype=cd, device=k.device)
    dv = torch.zeros(b, hkv, nk, v.shape[-1], dtype=cd, device=v.device)
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sharding.length((ring.rank - step - 1) % ring.world)
            recv = [k.new_empty(b, hkv, n, k.shape[-1]), v.new_empty(b, hkv, n, v.shape[-1])]
            pending = ring.exchange([kb, vb], recv)
        src = (ring.rank - step) % ring.world
        grad_block(
            qc,
            kb.to(cd).unsqueeze(2),
            vb.to(cd).unsqueeze(2),
            do,
            lse,
            delta,
            q_spans,
            sharding.spans(src),
            band,
            scale,
            dq,
            dk,
            dv,
        )
        if ring.world > 1:  # the accumulated dK/dV travel with their block (the last hop takes them home)
            n = sharding.length((ring.rank - step - 1) % ring.world)
            acc = [dk.new_empty(b, hkv, n, dk.shape[-1]), dv.new_empty(b, hkv, n, dv.shape[-1])]
            Ring.wait(ring.exchange([dk, dv], acc, tag=2))
            dk, dv = acc
        if pending is not None:
            Ring.wait(pending)
            kb, vb = recv
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sharding, band, scale, ring):
        out, lse = _forward(q, k, v, sharding, band, scale, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (sharding, band, scale, ring)
        return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None


def ring_attention_local(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sharding: Sharding, band: Band, scale: float | None, ring: Ring
) -> torch.Tensor:
    """Ring attention of this rank's shards (checked by the caller); differentiable in q, k and v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, sharding, band, scale, ring)
