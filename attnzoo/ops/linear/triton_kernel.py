"""Fused causal linear attention in Triton: the chunk computation of :func:`.chunked.chunk_core` on tensor cores.

Two kernels, as fla's ``chunk`` kernels:

* ``_states``: one program per (batch x KV head, block of features, block of value columns) walks the chunks in
  order, keeping its block of the state ``S [f, dv]`` (and the normaliser ``z [f]``) in float32 registers; it
  writes the state *entering* each chunk and updates it with ``(K_c * exp(G_end - G_j))^T V_c`` (one
  ``tl.dot``), the older state decayed by ``exp(G_end - G_start) <= 1``;
* ``_outputs``: one program per (chunk, batch x query head, block of value columns), all in parallel:
  ``num = exp(G_i - G_start) Q_c S_c + (Q_c K_c^T * exp(G_i - G_j), j <= i) V_c``, three ``tl.dot`` per
  block of features; the denominator comes from the same scores in the same program (``z`` for the state part,
  the row sums of the intra-chunk scores): the ones column of ``[v | 1]`` without widening ``v``.

Grouped KV heads are read in place (query head ``h`` reads KV head ``h // (hq // hkv)``); rows past the end
are masked. Backward: :class:`_ChunkCore` recomputes the chunk computation in PyTorch (:func:`.chunked.chunk_core`,
its matrix products on tensor cores) and differentiates it; the forward's kernels do not save anything for it.
"""
from __future__ import annotations

import torch

from ..sparse.triton_kernel.kernels import interpreted
from .chunked import chunk_core

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a dependency of torch on Linux
    triton = None

__all__ = ["available", "causal_parts_fused", "chunk_core_fused"]


def available() -> str | None:
    """None when the kernels can run here (CUDA, or Triton's interpreter), else why not."""
    if triton is None:
        return "Triton is not installed"
    if not torch.cuda.is_available() and not interpreted():
        return "needs a CUDA device (or TRITON_INTERPRET=1 for Triton's interpreter)"
    return None


if triton is not None:

    @triton.jit
    def _states(K, V, G, G0, S0, Z0, H, Z, SF, ZF, n, NC, F: tl.constexpr, DV: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        bh = tl.program_id(0)
        kb = tl.program_id(1)
        vb = tl.program_id(2)
        rk = kb * BK + tl.arange(0, BK)
        rv = vb * BV + tl.arange(0, BV)
        rc = tl.arange(0, C)
        mk, mv = rk < F, rv < DV
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
        if HAS_S0:
            S = tl.load(S0 + bh * F * DV + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :],
                        other=0.0).to(tl.float32)
            z = tl.load(Z0 + bh * F + rk, mask=mk, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        for c in range(NC):
            base = c * F * DV
            tl.store(H + bh * NC * F * DV + base + rk[:, None] * DV + rv[None, :], S, mask=mk[:, None] & mv[None, :])
            if vb == 0:
                tl.store(Z + bh * NC * F + c * F + rk, z, mask=mk)
            rows = c * C + rc
            mr = rows < n
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                        other=0.0)
            last = tl.minimum(c * C + C, n) - 1
            g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
            ge = tl.load(G + bh * n + last).to(tl.float32)
            w = tl.where(mr, tl.exp(ge - g), 0.0)
            kd = k.to(tl.float32) * w[:, None]
            a = tl.exp(ge - gp)
            S = S * a + tl.dot(tl.trans(kd.to(v.dtype)), v).to(tl.float32)
            z = z * a + tl.sum(kd, 0)
            gp = ge
        tl.store(SF + bh * F * DV + rk[:, None] * DV + rv[None, :], S, mask=mk[:, None] & mv[None, :])
        if vb == 0:
            tl.store(ZF + bh * F + rk, z, mask=mk)

    @triton.jit
    def _outputs(Q, K, V, G, G0, H, Z, NUM, DEN, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        vb = tl.program_id(2)
        bh = bhq // GROUP  # batch x KV head (the query heads of a group are consecutive)
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = vb * BV + tl.arange(0, BV)
        mv = rv < DV
        A = tl.zeros([C, C], dtype=tl.float32)
        o = tl.zeros([C, BV], dtype=tl.float32)
        dz = tl.zeros([C], dtype=tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            A += tl.dot(q, tl.trans(k)).to(tl.float32)
            o += tl.dot(q, h.to(q.dtype)).to(tl.float32)
            zc = tl.load(Z + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dz += tl.sum(q.to(tl.float32) * zc[None, :], 1)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        if c > 0:
            gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
        inter = tl.exp(g - gp)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :]
        A = tl.where(keep, A * tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        o = o * inter[:, None] + tl.dot(A.to(v.dtype), v).to(tl.float32)
        tl.store(NUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], o, mask=mr[:, None] & mv[None, :])
        if vb == 0:
            tl.store(DEN + bhq * n + rows, dz * inter + tl.sum(A, 1), mask=mr)


def _pow2(x: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(x)))


def chunk_core_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """:func:`.chunked.chunk_core` on the Triton kernels (forward), same arguments and results; float32
    results and state. ``chunk`` is rounded to a power of two >= 16."""
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    C = _pow2(chunk, 16, 128)
    nc = -(-n // C)
    dt = qf.dtype if qf.dtype in (torch.float16, torch.bfloat16) else torch.float32
    qf, kt, v = qf.to(dt).contiguous(), kt.to(dt).contiguous(), v.to(dt).contiguous()
    G = G.float().contiguous()
    G0 = G0.float().contiguous()
    dev = qf.device
    H = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    Z = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    SF = torch.empty(b, hkv, f, dv, dtype=torch.float32, device=dev)
    ZF = torch.empty(b, hkv, f, dtype=torch.float32, device=dev)
    has_s0 = S0 is not None
    s0 = S0[..., :dv].float().contiguous() if has_s0 else SF
    z0 = S0[..., dv].float().contiguous() if has_s0 else ZF
    BK, BV = _pow2(f), _pow2(dv)
    _states[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, BV))](
        kt, v, G, G0, s0, z0, H, Z, SF, ZF, n, nc, F=f, DV=dv, C=C, BK=BK, BV=BV, HAS_S0=has_s0)
    num = torch.empty(b, hq, n, dv, dtype=torch.float32, device=dev)
    den = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    _outputs[(nc, b * hq, triton.cdiv(dv, BV))](
        qf, kt, v, G, G0, H, Z, num, den, n, nc, hq // hkv, F=f, DV=dv, C=C, BK=BK, BV=BV)
    return num, den, torch.cat([SF, ZF[..., None]], -1)


class _ChunkCore(torch.autograd.Function):
    """Forward on the kernels; backward by differentiating :func:`.chunked.chunk_core` (recomputed)."""

    @staticmethod
    def forward(ctx, qf, kt, v, G, G0, S0, chunk, gated):
        ctx.save_for_backward(qf, kt, v, G, G0, S0 if S0 is not None else torch.empty(0))
        ctx.has_s0, ctx.chunk, ctx.gated = S0 is not None, chunk, gated
        return chunk_core_fused(qf, kt, v, G, G0, S0, chunk=chunk, gated=gated)

    @staticmethod
    def backward(ctx, dnum, dden, dS):
        qf, kt, v, G, G0, S0 = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (qf, kt, v, G, G0)]
        s0 = S0.detach().requires_grad_(S0.requires_grad) if ctx.has_s0 else None
        with torch.enable_grad():
            num, den, S = chunk_core(*inputs, s0, chunk=ctx.chunk, gated=ctx.gated)
            wrt = [t for t in inputs + [s0] if t is not None and t.requires_grad]
            grads = torch.autograd.grad([num, den, S], wrt, [dnum, dden, dS], allow_unused=True) if wrt else []
        it = iter(grads)
        out = [next(it) if t is not None and t.requires_grad else None for t in inputs + [s0]]
        return (*out, None, None)


def _fits(qf, kt, v) -> bool:
    return qf.shape[-1] >= 16 and v.shape[-1] >= 16 and qf.dtype != torch.float64


def causal_parts_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """The ``core`` for :func:`.chunked.causal_parts`: the kernels where the shapes suit tensor cores (feature
    and value widths >= 16, not float64), else :func:`.chunked.chunk_core`."""
    if not _fits(qf, kt, v):
        return chunk_core(qf, kt, v, G, G0, S0, chunk=chunk, gated=gated)
    return _ChunkCore.apply(qf, kt, v, G, G0, S0, chunk, gated)
