"""Ring attention (Liu et al. 2023): K/V blocks travel around the ranks while each rank attends its queries.

Forward: ``world`` steps; at step ``s`` rank ``r`` holds the K/V block of rank ``r - s`` and already sends it on to
``r + 1`` (receiving the next from ``r - 1``) while it computes, so communication overlaps compute. Partial
results merge by log-sum-exp. Backward, the reverse ring: the K/V blocks go round again, each followed by the gradient
of its keys and values accumulated by the ranks it visited (sent on while the next step computes); after the last
step one more hop brings each accumulated ``dK``/``dV`` home. Queries never move; ``dQ`` stays local.

The work on one visiting block is a *block kernel* (:data:`KERNELS`): ``"eager"`` (:mod:`.blocks`, tiled
matmuls, any device and dtype, the CPU tests' path) or ``"flex"`` (:mod:`.blocks_flex`, FlexAttention's fused
kernels, CUDA); ``"auto"`` takes flex where it serves.
"""

from __future__ import annotations

import math

import torch

from ...errors import BackendUnavailableError
from .blocks import Band, attend_block, grad_block
from .blocks_flex import attend_block_flex, flex_reason, grad_block_flex
from .comm import Ring
from .sharding import Sharding

__all__ = ["ring_attention_local", "KERNELS", "choose_kernel"]

KERNELS = ("auto", "eager", "flex")


def choose_kernel(kernel: str, q: torch.Tensor) -> str:
    """The block kernel that runs: ``"auto"`` is flex where :func:`.blocks_flex.flex_reason` allows, else eager;
    a forced ``"flex"`` that cannot serve raises :class:`~attnzoo.errors.BackendUnavailableError`."""
    if kernel == "eager":
        return kernel
    why = flex_reason(q)
    if why is None:
        return "flex"
    if kernel == "flex":
        raise BackendUnavailableError(f"kernel='flex' cannot serve this call: {why}")
    return "eager"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _g(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, N, .]`` -> ``[B, Hkv, G, N, .]`` (a view of a contiguous tensor)."""
    b, hq = t.shape[:2]
    return t.view(b, kv_heads, hq // kv_heads, *t.shape[2:])


def _attend(kernel, q, kb, vb, q_spans, k_spans, band, scale, out, lse, cd):
    if kernel == "flex":
        attend_block_flex(q, kb, vb, q_spans, k_spans, band, scale, out, lse)
        return
    hkv = kb.shape[1]
    attend_block(
        _g(q, hkv),
        kb.to(cd).unsqueeze(2),
        vb.to(cd).unsqueeze(2),
        q_spans,
        k_spans,
        band,
        scale,
        _g(out, hkv),
        _g(lse, hkv),
    )


def _grad(kernel, q, kb, vb, do, lse, delta, q_spans, k_spans, band, scale, dq, dk, dv, cd):
    if kernel == "flex":
        grad_block_flex(q, kb, vb, do, lse, delta, q_spans, k_spans, band, scale, dq, dk, dv)
        return
    hkv = kb.shape[1]
    grad_block(
        _g(q, hkv),
        kb.to(cd).unsqueeze(2),
        vb.to(cd).unsqueeze(2),
        _g(do, hkv),
        _g(lse, hkv),
        _g(delta, hkv),
        q_spans,
        k_spans,
        band,
        scale,
        _g(dq, hkv),
        dk,
        dv,
    )


def _forward(q, k, v, sharding: Sharding, band: Band, scale: float, ring: Ring, kernel: str):
    b, hkv, _, _ = k.shape
    cd = _compute_dtype(q.dtype)
    qk = q.contiguous() if kernel == "flex" else q.to(cd).contiguous()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=cd, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=cd, device=q.device)
    q_spans = sharding.spans(ring.rank)
    kb, vb = k.contiguous(), v.contiguous()
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sharding.length((ring.rank - step - 1) % ring.world)
            recv = [k.new_empty(b, hkv, n, k.shape[-1]), v.new_empty(b, hkv, n, v.shape[-1])]
            pending = ring.exchange([kb, vb], recv)
        src = (ring.rank - step) % ring.world
        _attend(kernel, qk, kb, vb, q_spans, sharding.spans(src), band, scale, out, lse, cd)
        if pending is not None:
            Ring.wait(pending)
            kb, vb = recv
    return out, lse


def _backward(q, k, v, out, lse, grad_out, sharding: Sharding, band: Band, scale: float, ring: Ring, kernel: str):
    b, hkv, nk, _ = k.shape
    cd = out.dtype
    qk = q.contiguous() if kernel == "flex" else q.to(cd).contiguous()
    do = grad_out.contiguous() if kernel == "flex" else grad_out.to(cd).contiguous()
    delta = (grad_out.to(cd) * out).sum(-1)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    q_spans = sharding.spans(ring.rank)
    kb, vb = k.contiguous(), v.contiguous()
    # The dK/dV accumulated for a block travel with it: computed into fresh buffers, then the sum of the earlier
    # ranks' (received during this step's compute) added, and sent on during the next step's compute; the last
    # hop takes each block's sum home.
    incoming = None  # (requests, [dK, dV] received): the accumulated sums of the block held at this step
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sharding.length((ring.rank - step - 1) % ring.world)
            recv = [k.new_empty(b, hkv, n, k.shape[-1]), v.new_empty(b, hkv, n, v.shape[-1])]
            pending = ring.exchange([kb, vb], recv)
        src = (ring.rank - step) % ring.world
        n_src = sharding.length(src)
        dk = torch.zeros(b, hkv, n_src, k.shape[-1], dtype=cd, device=k.device)
        dv = torch.zeros(b, hkv, n_src, v.shape[-1], dtype=cd, device=v.device)
        _grad(kernel, qk, kb, vb, do, lse, delta, q_spans, sharding.spans(src), band, scale, dq, dk, dv, cd)
        if incoming is not None:
            Ring.wait(incoming[0])
            dk += incoming[1][0]
            dv += incoming[1][1]
        if ring.world > 1:
            n = sharding.length((ring.rank - step - 1) % ring.world)
            acc = [dk.new_empty(b, hkv, n, dk.shape[-1]), dv.new_empty(b, hkv, n, dv.shape[-1])]
            incoming = (ring.exchange([dk, dv], acc, tag=2), acc, (dk, dv))  # the sent buffers kept alive
        if pending is not None:
            Ring.wait(pending)
            kb, vb = recv
    if incoming is not None:  # this rank's own block, summed over every rank
        Ring.wait(incoming[0])
        dk, dv = incoming[1]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sharding, band, scale, ring, kernel):
        out, lse = _forward(q, k, v, sharding, band, scale, ring, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (sharding, band, scale, ring, kernel)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def ring_attention_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sharding: Sharding,
    band: Band,
    scale: float | None,
    ring: Ring,
    kernel: str = "auto",
) -> torch.Tensor:
    """Ring attention of this rank's shards (checked by the caller); differentiable in q, k and v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, sharding, band, scale, ring, choose_kernel(kernel, q))
