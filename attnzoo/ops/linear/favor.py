"""Non-causal FAVOR+ attention with the feature map fused into the two GEMMs (Triton), forward and backward.

``favor_attention(q, k, v, projection, scale=..., key_padding_mask=...)`` equals
``linear_attention(phi(q), phi(k), v)`` with FAVOR+'s ``phi(x) = exp(w.x' - |x'|^2 / 2)``, ``x' = x sqrt(scale)``
(``attnzoo.variants.feature_maps.favor_features``; its constant ``1/sqrt(m)`` cancels), without ever writing the
``[b, h, n, m]`` feature rows: the features are computed in registers from ``q``/``k`` (``[n, d]``, ``d`` = 64
where ``m`` = 256: a quarter of the bytes) and consumed there.

* ``_kv_state``: per KV head, block of features and split of the keys: ``u = k' W^T - |k'|^2 / 2`` on tensor
  cores, ``phi~ = exp(u - running max)`` (padding keys 0), ``S += phi~^T V``, ``z += sum phi~``; the splits'
  partial states are combined at the global maximum in PyTorch (small: ``[splits, m, dv]``). The global maximum
  over keys and features is the op's non-causal key stabiliser (:mod:`.chunked`).
* ``_out``: per query head and block of queries, over blocks of features with an online row maximum (it cancels
  between numerator and denominator): ``num = phi~ S``, ``den = phi~ z``, the output ``num / den``; keeps the
  row maximum and ``den`` for the backward.
* backward: ``_dstate`` (``dS = sum_i phi~_i dO_i^T / den_i``, ``dz = -sum_i phi~_i Delta_i / den_i``, per KV head
  over its query heads, split like ``_kv_state``), ``_dq`` and ``_dk`` (``dphi`` times ``phi`` is the gradient of
  ``u``; ``dx = (du W - sum(du) x') sqrt(scale)``, and ``dv = phi~ dS``).

The projection takes no gradient here (the ``performer`` variant's buffer); learned maps go the unfused way.
"""
from __future__ import annotations

import math

import torch

from ...errors import check_choice
from ..sparse.triton_kernel.kernels import interpreted
from .op import BACKENDS

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a dependency of torch on Linux
    triton = None

__all__ = ["favor_attention", "favor_fits"]


def favor_fits(q, v, projection, backend: str = "auto") -> bool:
    """Whether :func:`favor_attention` runs here: Triton on CUDA (``backend="triton"``: or its interpreter),
    head and value widths in [16, 128], half precision or float32, a shared ``[m, d]`` projection that takes no
    gradient; ``backend="torch"``: never."""
    check_choice("backend", backend, BACKENDS)
    if triton is None or backend == "torch" or not (q.is_cuda or (backend == "triton" and interpreted())):
        return False
    return (16 <= q.shape[-1] <= 128 and 16 <= v.shape[-1] <= 128 and q.dtype != torch.float64
            and projection.dim() == 2 and not (projection.requires_grad and torch.is_grad_enabled()))


if triton is not None:

    @triton.jit
    def _rows(X, bh, rows, mr, n, D: tl.constexpr, BD: tl.constexpr):
        rd = tl.arange(0, BD)
        return tl.load(X + bh * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & (rd < D)[None, :],
                       other=0.0)

    @triton.jit
    def _features(x, P, rm, M, sc, D: tl.constexpr, BD: tl.constexpr):
        """``x W'^T - scale |x|^2 / 2`` ``[BN, BM]`` for the rows ``x [BN, BD]`` (``W' = W sqrt(scale)``; -inf
        past the last feature)."""
        rd = tl.arange(0, BD)
        w = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
        xf = x.to(tl.float32)
        u = tl.dot(x, tl.trans(w.to(x.dtype))).to(tl.float32) - 0.5 * sc * tl.sum(xf * xf, 1)[:, None]
        return tl.where((rm < M)[None, :], u, float("-inf"))

    @triton.jit
    def _kv_state(K, V, P, VALID, SP, ZP, MP, n, HKV, per, M, sc, D: tl.constexpr, DV: tl.constexpr,
                  BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr):
        bh = tl.program_id(0)
        mb = tl.program_id(1)
        sp = tl.program_id(2)
        nmb = tl.num_programs(1)
        rm = mb * BM + tl.arange(0, BM)
        rv = tl.arange(0, BV)
        mv = rv < DV
        S = tl.zeros([BM, BV], dtype=tl.float32)
        z = tl.zeros([BM], dtype=tl.float32)
        run = tl.max(tl.full([BM], float("-inf"), dtype=tl.float32), 0)
        for j0 in range(sp * per, tl.minimum(sp * per + per, n), BN):
            rows = j0 + tl.arange(0, BN)
            mr = rows < n
            ok = mr
            if HAS_VALID:
                ok = ok & (tl.load(VALID + (bh // HKV) * n + rows, mask=mr, other=0) != 0)
            x = _rows(K, bh, rows, mr, n, D, BD)
            keep = ok[:, None] & (rm < M)[None, :]
            u = tl.where(keep, _features(x, P, rm, M, sc, D, BD), float("-inf"))
            new = tl.maximum(run, tl.max(tl.max(u, 1), 0))
            seen = new > float("-inf")  # else nothing so far: keep everything at 0
            a = tl.where(seen, tl.exp(tl.where(seen, run - new, 0.0)), 1.0)
            phi = tl.where(keep, tl.exp(tl.where(keep, u - new, 0.0)), 0.0)
            v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                        other=0.0)
            S = S * a + tl.dot(tl.trans(phi.to(v.dtype)), v).to(tl.float32)
            z = z * a + tl.sum(phi, 0)
            run = new
        base = (bh * nmb + mb) * tl.num_programs(2) + sp
        tl.store(SP + base * BM * BV + tl.arange(0, BM)[:, None] * BV + rv[None, :], S)
        tl.store(ZP + base * BM + tl.arange(0, BM), z)
        tl.store(MP + base, run)

    @triton.jit
    def _out(Q, P, S, Z, OUT, RM, DEN, n, GROUP, M, sc, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr,
             BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
        bhq = tl.program_id(0)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        bh = bhq // GROUP
        rv = tl.arange(0, BV)
        mv = rv < DV
        acc = tl.zeros([BN, BV], dtype=tl.float32)
        den = tl.zeros([BN], dtype=tl.float32)
        run = tl.full([BN], float("-inf"), dtype=tl.float32)
        x = _rows(Q, bhq, rows, mr, n, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, rm, M, sc, D, BD)
            new = tl.maximum(run, tl.max(u, 1))
            a = tl.exp(run - new)
            phi = tl.exp(u - new[:, None])
            s = tl.load(S + bh * M * DV + rm[:, None] * DV + rv[None, :], mask=(rm < M)[:, None] & mv[None, :],
                        other=0.0)
            zb = tl.load(Z + bh * M + rm, mask=rm < M, other=0.0)
            acc = acc * a[:, None] + tl.dot(phi.to(x.dtype), s.to(x.dtype)).to(tl.float32)
            den = den * a + tl.sum(phi * zb[None, :], 1)
            run = new
        ok = den > 0
        safe = tl.where(ok, den, 1.0)
        tl.store(OUT + bhq * n * DV + rows[:, None] * DV + rv[None, :], acc / safe[:, None],
                 mask=mr[:, None] & mv[None, :])
        tl.store(RM + bhq * n + rows, run, mask=mr)
        tl.store(DEN + bhq * n + rows, den, mask=mr)

    @triton.jit
    def _dstate(Q, P, DO, DELTA, RM, DEN, DSP, DZP, n, GROUP, per, M, sc, D: tl.constexpr, DV: tl.constexpr,
                BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
        bh = tl.program_id(0)
        mb = tl.program_id(1)
        sp = tl.program_id(2)
        rm = mb * BM + tl.arange(0, BM)
        rv = tl.arange(0, BV)
        mv = rv < DV
        dS = tl.zeros([BM, BV], dtype=tl.float32)
        dz = tl.zeros([BM], dtype=tl.float32)
        for h in range(GROUP):
            bhq = bh * GROUP + h
            for i0 in range(sp * per, tl.minimum(sp * per + per, n), BN):
                rows = i0 + tl.arange(0, BN)
                mr = rows < n
                u = _features(_rows(Q, bhq, rows, mr, n, D, BD), P, rm, M, sc, D, BD)
                run = tl.load(RM + bhq * n + rows, mask=mr, other=0.0)
                den = tl.load(DEN + bhq * n + rows, mask=mr, other=0.0)
                w = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
                phi = tl.where(mr[:, None] & (rm < M)[None, :], tl.exp(u - run[:, None]), 0.0) * w[:, None]
                do = tl.load(DO + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                             other=0.0)
                dl = tl.load(DELTA + bhq * n + rows, mask=mr, other=0.0)
                dS += tl.dot(tl.trans(phi.to(do.dtype)), do).to(tl.float32)
                dz -= tl.sum(phi * dl[:, None], 0)
        base = (bh * tl.num_programs(1) + mb) * tl.num_programs(2) + sp
        tl.store(DSP + base * BM * BV + tl.arange(0, BM)[:, None] * BV + rv[None, :], dS)
        tl.store(DZP + base * BM + tl.arange(0, BM), dz)

    @triton.jit
    def _dq(Q, P, S, Z, DO, DELTA, RM, DEN, DQ, n, GROUP, M, sc, D: tl.constexpr, DV: tl.constexpr,
            BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
        bhq = tl.program_id(0)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        bh = bhq // GROUP
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        run = tl.load(RM + bhq * n + rows, mask=mr, other=0.0)
        den = tl.load(DEN + bhq * n + rows, mask=mr, other=0.0)
        w = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        do = tl.load(DO + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dl = tl.load(DELTA + bhq * n + rows, mask=mr, other=0.0)
        dx = tl.zeros([BN, BD], dtype=tl.float32)
        tot = tl.zeros([BN], dtype=tl.float32)
        x = _rows(Q, bhq, rows, mr, n, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, rm, M, sc, D, BD)
            phi = tl.where((rm < M)[None, :], tl.exp(u - run[:, None]), 0.0)
            s = tl.load(S + bh * M * DV + rm[:, None] * DV + rv[None, :], mask=(rm < M)[:, None] & mv[None, :],
                        other=0.0)
            zb = tl.load(Z + bh * M + rm, mask=rm < M, other=0.0)
            dphi = (tl.dot(do, tl.trans(s.to(do.dtype))).to(tl.float32) - dl[:, None] * zb[None, :]) * w[:, None]
            du = phi * dphi
            wp = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
            dx += tl.dot(du.to(x.dtype), wp.to(x.dtype)).to(tl.float32)
            tot += tl.sum(du, 1)
        dx -= sc * tot[:, None] * x.to(tl.float32)
        tl.store(DQ + bhq * n * D + rows[:, None] * D + rd[None, :], dx, mask=mr[:, None] & (rd < D)[None, :])

    @triton.jit
    def _dk(K, V, P, VALID, MG, DS, DZ, DK, DVV, n, HKV, M, sc, D: tl.constexpr, DV: tl.constexpr,
            BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr):
        bh = tl.program_id(0)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        ok = mr
        if HAS_VALID:
            ok = ok & (tl.load(VALID + (bh // HKV) * n + rows, mask=mr, other=0) != 0)
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        mg = tl.load(MG + bh)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dx = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BV], dtype=tl.float32)
        tot = tl.zeros([BN], dtype=tl.float32)
        x = _rows(K, bh, rows, mr, n, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, rm, M, sc, D, BD)
            keep = ok[:, None] & (rm < M)[None, :]
            phi = tl.where(keep, tl.exp(tl.where(keep, u - mg, 0.0)), 0.0)
            ds = tl.load(DS + bh * M * DV + rm[:, None] * DV + rv[None, :], mask=(rm < M)[:, None] & mv[None, :],
                         other=0.0)
            dzb = tl.load(DZ + bh * M + rm, mask=rm < M, other=0.0)
            dphi = tl.dot(v, tl.trans(ds.to(v.dtype))).to(tl.float32) + dzb[None, :]
            dv += tl.dot(phi.to(v.dtype), ds.to(v.dtype)).to(tl.float32)
            du = phi * dphi
            wp = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
            dx += tl.dot(du.to(x.dtype), wp.to(x.dtype)).to(tl.float32)
            tot += tl.sum(du, 1)
        dx -= sc * tot[:, None] * x.to(tl.float32)
        tl.store(DK + bh * n * D + rows[:, None] * D + rd[None, :], dx, mask=mr[:, None] & (rd < D)[None, :])
        tl.store(DVV + bh * n * DV + rows[:, None] * DV + rv[None, :], dv, mask=mr[:, None] & mv[None, :])


BN, BM = 64, 64


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _splits(n: int) -> tuple[int, int]:
    """(splits, keys per split): up to 16 splits of whole blocks."""
    blocks = -(-n // BN)
    sp = min(16, blocks)
    per = -(-blocks // sp) * BN
    return -(-n // per), per


def _state(k, v, w, valid, scale):
    """``(S [b*hkv, m, dv], z [b*hkv, m], Mg [b*hkv])``: the keys' state at the global maximum ``Mg``."""
    b, hkv, n, d = k.shape
    dv, m = v.shape[-1], w.shape[0]
    nmb = -(-m // BM)
    sp, per = _splits(n)
    BV = _pow2(dv)
    dev = k.device
    SP = torch.empty(b * hkv, nmb, sp, BM, BV, dtype=torch.float32, device=dev)
    ZP = torch.empty(b * hkv, nmb, sp, BM, dtype=torch.float32, device=dev)
    MP = torch.empty(b * hkv, nmb, sp, dtype=torch.float32, device=dev)
    _kv_state[(b * hkv, nmb, sp)](k, v, w, valid if valid is not None else MP, SP, ZP, MP, n, hkv, per, m, scale,
                                  D=d, DV=dv, BN=BN, BM=BM, BD=_pow2(d), BV=BV, HAS_VALID=valid is not None)
    Mg = MP.amax((1, 2))
    Mg = Mg.masked_fill(torch.isinf(Mg), 0.0)
    f = (MP - Mg[:, None, None]).exp()  # exp(-inf) = 0: splits without a key
    S = (SP * f[..., None, None]).sum(2).reshape(b * hkv, nmb * BM, BV)[:, :m, :dv].contiguous()
    z = (ZP * f[..., None]).sum(2).reshape(b * hkv, nmb * BM)[:, :m].contiguous()
    return S, z, Mg.contiguous()


class _Favor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, valid, scale):
        b, hq, n, d = q.shape
        hkv, dv, m = k.shape[1], v.shape[-1], w.shape[0]
        S, z, Mg = _state(k, v, w, valid, scale)
        out = torch.empty(b, hq, n, dv, dtype=q.dtype, device=q.device)
        rm = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        den = torch.empty_like(rm)
        _out[(b * hq, triton.cdiv(n, BN))](q, w, S, z, out, rm, den, n, hq // hkv, m, scale, D=d, DV=dv, BN=BN, BM=BM,
                                           BD=_pow2(d), BV=_pow2(dv))
        ctx.save_for_backward(q, k, v, w, valid, S, z, Mg, out, rm, den)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, w, valid, S, z, Mg, out, rm, den = ctx.saved_tensors
        scale = ctx.scale
        b, hq, n, d = q.shape
        hkv, dv, m = k.shape[1], v.shape[-1], w.shape[0]
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        nmb = -(-m // BM)
        sp, per = _splits(n)
        BV, BD = _pow2(dv), _pow2(d)
        dev = q.device
        DSP = torch.empty(b * hkv, nmb, sp, BM, BV, dtype=torch.float32, device=dev)
        DZP = torch.empty(b * hkv, nmb, sp, BM, dtype=torch.float32, device=dev)
        _dstate[(b * hkv, nmb, sp)](q, w, dout, delta, rm, den, DSP, DZP, n, hq // hkv, per, m, scale, D=d, DV=dv,
                                    BN=BN, BM=BM, BD=BD, BV=BV)
        dS = DSP.sum(2).reshape(b * hkv, nmb * BM, BV)[:, :m, :dv].contiguous()
        dz = DZP.sum(2).reshape(b * hkv, nmb * BM)[:, :m].contiguous()
        dq = torch.empty(b, hq, n, d, dtype=torch.float32, device=dev)
        _dq[(b * hq, triton.cdiv(n, BN))](q, w, S, z, dout, delta, rm, den, dq, n, hq // hkv, m, scale, D=d, DV=dv,
                                          BN=BN, BM=BM, BD=BD, BV=BV)
        dk = torch.empty(b, hkv, n, d, dtype=torch.float32, device=dev)
        dvv = torch.empty(b, hkv, n, dv, dtype=torch.float32, device=dev)
        _dk[(b * hkv, triton.cdiv(n, BN))](k, v, w, valid if valid is not None else Mg, Mg, dS, dz, dk, dvv, n, hkv,
                                           m, scale, D=d, DV=dv, BN=BN, BM=BM, BD=BD, BV=BV,
                                           HAS_VALID=valid is not None)
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None, None


def favor_attention(q, k, v, projection, *, scale: float, key_padding_mask=None) -> torch.Tensor:
    """Non-causal FAVOR+ attention of ``q [b, hq, n, d]``, ``k [b, hkv, n, d]``, ``v [b, hkv, n, dv]`` with the
    random features ``projection [m, d]`` (rows ``w``; ``phi(x) = exp(w.x' - |x'|^2/2)``, ``x' = x
    sqrt(scale)``), ``key_padding_mask [b, n]`` True = keep; the feature map fused into the two GEMMs (see the
    module docstring; :func:`favor_fits` says where it runs). Returns ``[b, hq, n, dv]`` in ``v``'s dtype."""
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = (projection.detach().float() * math.sqrt(scale)).to(dt).contiguous()
    valid = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
    out = _Favor.apply(q.to(dt).contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(), w, valid, float(scale))
    return out.to(v.dtype)
