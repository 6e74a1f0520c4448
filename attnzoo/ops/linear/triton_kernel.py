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
are masked. Backward (:class:`_ChunkCore`), three kernels: ``_states_bwd`` walks the chunks in reverse for the
gradient of the state after each chunk (``dH_c = a_c dH_{c+1} + sum_i D_i q_i dO_i^T``, the denominator's
gradient beside it as ``dz``), then ``_dq`` (per chunk and query head) and ``_dkv`` (per chunk and KV head, over
its query heads: no atomics) in parallel. The forward keeps the per-chunk states for them.
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


    @triton.jit
    def _states_bwd(Q, DNUM, DDEN, G, G0, DSF, DZF, DH, DZ, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Reverse walk: the gradient of the state after each chunk (``DH[c]``: after chunk ``c``), from the final
        state's (``DSF``, ``DZF``) and every chunk's queries: ``dH_c = a_c dH_{c+1} + sum_i D_i q_i dO_i^T``."""
        bh = tl.program_id(0)
        kb = tl.program_id(1)
        vb = tl.program_id(2)
        rk = kb * BK + tl.arange(0, BK)
        rv = vb * BV + tl.arange(0, BV)
        rc = tl.arange(0, C)
        mk, mv = rk < F, rv < DV
        dS = tl.load(DSF + bh * F * DV + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        dz = tl.load(DZF + bh * F + rk, mask=mk, other=0.0).to(tl.float32)
        g0 = tl.load(G0 + bh).to(tl.float32)
        for cc in range(NC):
            c = NC - 1 - cc
            tl.store(DH + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :], dS,
                     mask=mk[:, None] & mv[None, :])
            if vb == 0:
                tl.store(DZ + bh * NC * F + c * F + rk, dz, mask=mk)
            rows = c * C + rc
            mr = rows < n
            last = tl.minimum(c * C + C, n) - 1
            ge = tl.load(G + bh * n + last).to(tl.float32)
            gp = g0
            if c > 0:
                gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
            g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
            d = tl.where(mr, tl.exp(g - gp), 0.0)
            dS = dS * tl.exp(ge - gp)
            dz = dz * tl.exp(ge - gp)
            for h in range(GROUP):
                bhq = bh * GROUP + h
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                             other=0.0)
                dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0)
                qd = q.to(tl.float32) * d[:, None]
                dS += tl.dot(tl.trans(qd.to(q.dtype)), do.to(q.dtype)).to(tl.float32)
                dz += tl.sum(qd * dd[:, None], 0)

    @triton.jit
    def _dq(Q, K, V, G, G0, H, Z, DNUM, DDEN, DQ, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """``dq_i = D_i (dO_i H_c^T + dden_i z_c) + sum_{j <= i} (dO_i . v_j + dden_i) e^{g_i - g_j} k_j``."""
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        bh = bhq // GROUP
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = tl.arange(0, BV)
        mv = rv < DV
        do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        if c > 0:
            gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
        d = tl.exp(g - gp)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :] & mr[:, None]
        dA = tl.dot(do.to(v.dtype), tl.trans(v)).to(tl.float32) + dd[:, None]
        dA = tl.where(keep, dA * tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            z = tl.load(Z + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dq = tl.dot(dA.to(k.dtype), k).to(tl.float32)
            dq += d[:, None] * (tl.dot(do.to(k.dtype), tl.trans(h.to(k.dtype))).to(tl.float32) + dd[:, None] * z[None, :])
            tl.store(DQ + bhq * n * F + rows[:, None] * F + rk[None, :], dq, mask=mr[:, None] & mk[None, :])

    @triton.jit
    def _dkv(Q, K, V, G, DH, DZ, DNUM, DDEN, DK, DV_, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Per chunk and KV head, over its query heads: ``dv_j = sum_i A_ij dO_i + w_j k_j dH``,
        ``dk_j = sum_i dA_ij e^{g_i - g_j} q_i + w_j (dH v_j + dz)``, ``w_j = e^{g_end - g_j}``, ``dH``/``dz`` the
        gradient of the state after this chunk."""
        c = tl.program_id(0)
        bh = tl.program_id(1)
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = tl.arange(0, BV)
        mv = rv < DV
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        last = tl.minimum(c * C + C, n) - 1
        ge = tl.load(G + bh * n + last).to(tl.float32)
        w = tl.where(mr, tl.exp(ge - g), 0.0)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :] & mr[:, None]
        decay = tl.where(keep, tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        for h in range(GROUP):
            bhq = bh * GROUP + h
            s = tl.zeros([C, C], dtype=tl.float32)
            for k0 in range(0, F, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < F
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                s += tl.dot(q, tl.trans(k)).to(tl.float32)
            do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                         other=0.0)
            dv += tl.dot(tl.trans((s * decay).to(do.dtype)), do).to(tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            dh = tl.load(DH + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                         mask=mk[:, None] & mv[None, :], other=0.0)
            dz = tl.load(DZ + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dv += w[:, None] * tl.dot(k, dh.to(k.dtype)).to(tl.float32)
            dk = w[:, None] * (tl.dot(v, tl.trans(dh.to(v.dtype))).to(tl.float32) + dz[None, :])
            for h in range(GROUP):
                bhq = bh * GROUP + h
                do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                             other=0.0)
                dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                dp = (tl.dot(do.to(v.dtype), tl.trans(v)).to(tl.float32) + dd[:, None]) * decay
                dk += tl.dot(tl.trans(dp.to(q.dtype)), q).to(tl.float32)
            tl.store(DK + bh * n * F + rows[:, None] * F + rk[None, :], dk, mask=mr[:, None] & mk[None, :])
        tl.store(DV_ + bh * n * DV + rows[:, None] * DV + rv[None, :], dv, mask=mr[:, None] & mv[None, :])


def _pow2(x: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(x)))


def _forward(qf, kt, v, G, G0, S0, chunk):
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    C = _pow2(chunk, 16, 128)
    nc = -(-n // C)
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
    return num, den, torch.cat([SF, ZF[..., None]], -1), H, Z


def _prepare(qf, kt, v, G, G0):
    dt = qf.dtype if qf.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return (qf.to(dt).contiguous(), kt.to(dt).contiguous(), v.to(dt).contiguous(), G.float().contiguous(),
            G0.float().contiguous())


def chunk_core_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """:func:`.chunked.chunk_core` on the Triton kernels (forward), same arguments and results; float32
    results and state. ``chunk`` is rounded to a power of two >= 16."""
    return _forward(*_prepare(qf, kt, v, G, G0), S0, chunk)[:3]


def _backward(qf, kt, v, G, G0, H, Z, dnum, dden, dS, chunk):
    """(dq, dk, dv, dS0) of the chunk computation, on the kernels."""
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    C = _pow2(chunk, 16, 128)
    nc = -(-n // C)
    dev = qf.device
    BK, BV = _pow2(f), _pow2(dv, 16, 128)
    dnum = dnum.to(qf.dtype).contiguous()
    dden = dden.float().contiguous()
    dsf = dS[..., :dv].float().contiguous()
    dzf = dS[..., dv].float().contiguous()
    DH = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    DZ = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    g = hq // hkv
    _states_bwd[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, _pow2(dv)))](
        qf, dnum, dden, G, G0, dsf, dzf, DH, DZ, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=_pow2(dv))
    dq = torch.empty(b, hq, n, f, dtype=torch.float32, device=dev)
    _dq[(nc, b * hq)](qf, kt, v, G, G0, H, Z, dnum, dden, dq, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=BV)
    dk = torch.empty(b, hkv, n, f, dtype=torch.float32, device=dev)
    dvv = torch.empty(b, hkv, n, dv, dtype=torch.float32, device=dev)
    _dkv[(nc, b * hkv)](qf, kt, v, G, DH, DZ, dnum, dden, dk, dvv, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=BV)
    return dq, dk, dvv


class _ChunkCore(torch.autograd.Function):
    """The chunk computation on the kernels, forward and backward (the log-scales ``G`` and an initial state
    take no gradient here: :func:`causal_parts_fused` sends those cases to PyTorch)."""

    @staticmethod
    def forward(ctx, qf, kt, v, G, G0, chunk):
        args = _prepare(qf, kt, v, G, G0)
        num, den, S, H, Z = _forward(*args, None, chunk)
        ctx.save_for_backward(*args, H, Z)
        ctx.chunk, ctx.dtypes = chunk, (qf.dtype, kt.dtype, v.dtype)
        return num, den, S

    @staticmethod
    def backward(ctx, dnum, dden, dS):
        qf, kt, v, G, G0, H, Z = ctx.saved_tensors
        dq, dk, dv = _backward(qf, kt, v, G, G0, H, Z, dnum, dden, dS, ctx.chunk)
        tq, tk, tv = ctx.dtypes
        return dq.to(tq), dk.to(tk), dv.to(tv), None, None, None


def _fits(qf, kt, v) -> bool:
    return qf.shape[-1] >= 16 and 16 <= v.shape[-1] <= 128 and qf.dtype != torch.float64


def causal_parts_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """The ``core`` for :func:`.chunked.causal_parts`: the kernels where the shapes suit tensor cores (feature
    and value widths >= 16, value width <= 128, not float64); with an initial state (decoding, prefill with a
    cache) the forward kernels without autograd; else :func:`.chunked.chunk_core`."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qf, kt, v, G, G0, S0))
    if not _fits(qf, kt, v) or (grad and (S0 is not None or G.requires_grad or G0.requires_grad)):
        return chunk_core(qf, kt, v, G, G0, S0, chunk=chunk, gated=gated)
    if S0 is not None or not grad:
        return chunk_core_fused(qf, kt, v, G, G0, S0, chunk=chunk)
    return _ChunkCore.apply(qf, kt, v, G, G0, chunk)
