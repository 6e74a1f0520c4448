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
The kernels read ``q``, ``k``, ``v`` and ``dO`` by stride (a projection's ``[b, n, h, d]`` view, no copy), write
the output token-major and the gradients in their inputs' layout and dtype; each launches with its own
:data:`TILES` entry. ``favor_feature_rows`` (the causal path's FAVOR+ rows, :mod:`attnzoo.variants.feature_maps`)
is here too: one kernel writes the ``[.., m]`` rows once.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ...errors import check_choice
from ..sparse.triton_kernel.kernels import interpreted
from .op import BACKENDS

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a dependency of torch on Linux
    triton = None

__all__ = ["ExpMap", "exp_map_attention", "exp_map_fits", "favor_map", "favor_attention", "favor_feature_rows",
           "feature_rows_fit"]


class ExpMap(NamedTuple):
    """An exponential feature map, ``phi(x) = exp(x W^T + bias - norm |x|^2 / 2)`` up to a constant factor per
    row: ``weight [m, d]`` (shared) or ``[heads, m, d]``, ``bias [m]`` / ``[heads, m]`` or None. FAVOR+:
    :func:`favor_map`; hedgehog's ``[exp(xW + b), exp(-(xW + b))]``: ``weight = [W^T; -W^T]``, ``bias = [b;
    -b]`` (``attnzoo.variants.feature_maps.FeatureMap.exp_map``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    norm: float = 0.0


def exp_map_fits(q, v, q_map: ExpMap, k_map: ExpMap, backend: str = "auto") -> bool:
    """Whether :func:`exp_map_attention` runs here: Triton on CUDA (``backend="triton"``: or its interpreter),
    head and value widths in [16, 128], half precision or float32, maps of one width whose weights take no
    gradient; ``backend="torch"``: never."""
    check_choice("backend", backend, BACKENDS)
    if triton is None or backend == "torch" or not (q.is_cuda or (backend == "triton" and interpreted())):
        return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for mp in (q_map, k_map) for t in (mp.weight, mp.bias))
    return (16 <= q.shape[-1] <= 128 and 16 <= v.shape[-1] <= 128 and q.dtype != torch.float64 and not grad
            and q_map.weight.shape[-2:] == k_map.weight.shape[-2:] == (q_map.weight.shape[-2], q.shape[-1]))


if triton is not None:

    @triton.jit
    def _base(bh, H, sb, sh):
        """Offset of head ``bh`` (of ``b * H``) in a ``[b, H, n, D]`` tensor of strides ``(sb, sh, sn, 1)``."""
        return (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh

    @triton.jit
    def _rows(X, rows, mr, sn, D: tl.constexpr, BD: tl.constexpr):
        """Rows ``[BN, BD]`` of one head (``X`` at its base; ``sn`` the row stride)."""
        rd = tl.arange(0, BD)
        return tl.load(X + rows[:, None] * sn + rd[None, :], mask=mr[:, None] & (rd < D)[None, :], other=0.0)

    @triton.jit
    def _features(x, P, B, rm, M, sc, D: tl.constexpr, BD: tl.constexpr, HAS_B: tl.constexpr):
        """``x W^T + b - sc |x|^2 / 2`` ``[BN, BM]`` for the rows ``x [BN, BD]`` (``P``, ``B``: this head's
        ``W``, ``b``; -inf past the last feature)."""
        rd = tl.arange(0, BD)
        w = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
        xf = x.to(tl.float32)
        u = tl.dot(x, tl.trans(w.to(x.dtype))).to(tl.float32) - 0.5 * sc * tl.sum(xf * xf, 1)[:, None]
        if HAS_B:
            u += tl.load(B + rm, mask=rm < M, other=0.0).to(tl.float32)[None, :]
        return tl.where((rm < M)[None, :], u, float("-inf"))

    @triton.jit
    def _kv_state(K, skb, skh, skn, V, svb, svh, svn, P, B, VALID, SP, ZP, MP, n, HKV, per, M, sc, PS,
                  D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                  BV: tl.constexpr, HAS_VALID: tl.constexpr, HAS_B: tl.constexpr):
        bh = tl.program_id(0)
        P += (bh % HKV) * PS * D
        B += (bh % HKV) * PS
        K += _base(bh, HKV, skb, skh)
        V += _base(bh, HKV, svb, svh)
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
            x = _rows(K, rows, mr, skn, D, BD)
            keep = ok[:, None] & (rm < M)[None, :]
            u = tl.where(keep, _features(x, P, B, rm, M, sc, D, BD, HAS_B), float("-inf"))
            new = tl.maximum(run, tl.max(tl.max(u, 1), 0))
            seen = new > float("-inf")  # else nothing so far: keep everything at 0
            a = tl.where(seen, tl.exp(tl.where(seen, run - new, 0.0)), 1.0)
            phi = tl.where(keep, tl.exp(tl.where(keep, u - new, 0.0)), 0.0)
            v = tl.load(V + rows[:, None] * svn + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
            S = S * a + tl.dot(tl.trans(phi.to(v.dtype)), v).to(tl.float32)
            z = z * a + tl.sum(phi, 0)
            run = new
        base = (bh * nmb + mb) * tl.num_programs(2) + sp
        tl.store(SP + base * BM * BV + tl.arange(0, BM)[:, None] * BV + rv[None, :], S)
        tl.store(ZP + base * BM + tl.arange(0, BM), z)
        tl.store(MP + base, run)

    @triton.jit
    def _out(Q, sqb, sqh, sqn, P, B, S, Z, OUT, sob, soh, son, RM, DEN, n, GROUP, HQ, M, sc, PS, D: tl.constexpr,
             DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
             HAS_B: tl.constexpr):
        bhq = tl.program_id(0)
        P += (bhq % HQ) * PS * D
        B += (bhq % HQ) * PS
        Q += _base(bhq, HQ, sqb, sqh)
        OUT += _base(bhq, HQ, sob, soh)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        bh = bhq // GROUP
        rv = tl.arange(0, BV)
        mv = rv < DV
        acc = tl.zeros([BN, BV], dtype=tl.float32)
        den = tl.zeros([BN], dtype=tl.float32)
        run = tl.full([BN], float("-inf"), dtype=tl.float32)
        x = _rows(Q, rows, mr, sqn, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, B, rm, M, sc, D, BD, HAS_B)
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
        tl.store(OUT + rows[:, None] * son + rv[None, :], acc / safe[:, None], mask=mr[:, None] & mv[None, :])
        tl.store(RM + bhq * n + rows, run, mask=mr)
        tl.store(DEN + bhq * n + rows, den, mask=mr)

    @triton.jit
    def _dstate(Q, sqb, sqh, sqn, P, B, DO, sdb, sdh, sdn, DELTA, RM, DEN, DSP, DZP, n, GROUP, HQ, per, M, sc, PS,
                D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                BV: tl.constexpr, HAS_B: tl.constexpr):
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
            Qh = Q + _base(bhq, HQ, sqb, sqh)
            DOh = DO + _base(bhq, HQ, sdb, sdh)
            for i0 in range(sp * per, tl.minimum(sp * per + per, n), BN):
                rows = i0 + tl.arange(0, BN)
                mr = rows < n
                hp = (bhq % HQ) * PS
                u = _features(_rows(Qh, rows, mr, sqn, D, BD), P + hp * D, B + hp, rm, M, sc, D, BD, HAS_B)
                run = tl.load(RM + bhq * n + rows, mask=mr, other=0.0)
                den = tl.load(DEN + bhq * n + rows, mask=mr, other=0.0)
                w = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
                phi = tl.where(mr[:, None] & (rm < M)[None, :], tl.exp(u - run[:, None]), 0.0) * w[:, None]
                do = tl.load(DOh + rows[:, None] * sdn + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
                dl = tl.load(DELTA + bhq * n + rows, mask=mr, other=0.0)
                dS += tl.dot(tl.trans(phi.to(do.dtype)), do).to(tl.float32)
                dz -= tl.sum(phi * dl[:, None], 0)
        base = (bh * tl.num_programs(1) + mb) * tl.num_programs(2) + sp
        tl.store(DSP + base * BM * BV + tl.arange(0, BM)[:, None] * BV + rv[None, :], dS)
        tl.store(DZP + base * BM + tl.arange(0, BM), dz)

    @triton.jit
    def _dq(Q, sqb, sqh, sqn, P, B, S, Z, DO, sdb, sdh, sdn, DELTA, RM, DEN, DQ, sgb, sgh, sgn, n, GROUP, HQ, M, sc, PS,
            D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
            BV: tl.constexpr, HAS_B: tl.constexpr):
        bhq = tl.program_id(0)
        P += (bhq % HQ) * PS * D
        B += (bhq % HQ) * PS
        Q += _base(bhq, HQ, sqb, sqh)
        DO += _base(bhq, HQ, sdb, sdh)
        DQ += _base(bhq, HQ, sgb, sgh)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        bh = bhq // GROUP
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        run = tl.load(RM + bhq * n + rows, mask=mr, other=0.0)
        den = tl.load(DEN + bhq * n + rows, mask=mr, other=0.0)
        w = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        do = tl.load(DO + rows[:, None] * sdn + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dl = tl.load(DELTA + bhq * n + rows, mask=mr, other=0.0)
        dx = tl.zeros([BN, BD], dtype=tl.float32)
        tot = tl.zeros([BN], dtype=tl.float32)
        x = _rows(Q, rows, mr, sqn, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, B, rm, M, sc, D, BD, HAS_B)
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
        tl.store(DQ + rows[:, None] * sgn + rd[None, :], dx, mask=mr[:, None] & (rd < D)[None, :])

    @triton.jit
    def _dk(K, skb, skh, skn, V, svb, svh, svn, P, B, VALID, MG, DS, DZ, DK, sgb, sgh, sgn, DVV, swb, swh, swn, n, HKV,
            M, sc, PS, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
            BV: tl.constexpr, HAS_VALID: tl.constexpr, HAS_B: tl.constexpr):
        bh = tl.program_id(0)
        P += (bh % HKV) * PS * D
        B += (bh % HKV) * PS
        K += _base(bh, HKV, skb, skh)
        V += _base(bh, HKV, svb, svh)
        DK += _base(bh, HKV, sgb, sgh)
        DVV += _base(bh, HKV, swb, swh)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        mr = rows < n
        ok = mr
        if HAS_VALID:
            ok = ok & (tl.load(VALID + (bh // HKV) * n + rows, mask=mr, other=0) != 0)
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        mg = tl.load(MG + bh)
        v = tl.load(V + rows[:, None] * svn + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dx = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BV], dtype=tl.float32)
        tot = tl.zeros([BN], dtype=tl.float32)
        x = _rows(K, rows, mr, skn, D, BD)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            u = _features(x, P, B, rm, M, sc, D, BD, HAS_B)
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
        tl.store(DK + rows[:, None] * sgn + rd[None, :], dx, mask=mr[:, None] & (rd < D)[None, :])
        tl.store(DVV + rows[:, None] * swn + rv[None, :], dv, mask=mr[:, None] & mv[None, :])

    @triton.jit
    def _delta(DO, sdb, sdh, sdn, O, sob, soh, son, DELTA, n, H, DV: tl.constexpr, BN: tl.constexpr,
               BV: tl.constexpr):
        """``Delta = sum(dO * O, -1)`` in float32 per row ``[b h, n]`` (strided ``dO``, ``O``)."""
        bh = tl.program_id(1)
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mr = rows < n
        rv = tl.arange(0, BV)
        mk = mr[:, None] & (rv < DV)[None, :]
        do = tl.load(DO + _base(bh, H, sdb, sdh) + rows[:, None] * sdn + rv[None, :], mask=mk, other=0.0)
        o = tl.load(O + _base(bh, H, sob, soh) + rows[:, None] * son + rv[None, :], mask=mk, other=0.0)
        tl.store(DELTA + bh * n + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=mr)

    @triton.jit
    def _feature_rows(X, P, F, LOG, n, HP, M, rs, log_c, PS, D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                      BD: tl.constexpr):
        """FAVOR+'s feature rows of ``x [b h, n, D]`` (:func:`favor_feature_rows`): per block of rows, the
        maximum of ``u = x' W^T`` over all ``M`` features first, then ``exp(u - max)`` written once."""
        bh = tl.program_id(1)
        P += (bh % HP) * PS * D
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        mr = rows < n
        rd = tl.arange(0, BD)
        x = tl.load(X + bh * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & (rd < D)[None, :],
                    other=0.0)
        xf = x.to(tl.float32) * rs
        xs = xf.to(x.dtype)
        top = tl.full([BN], float("-inf"), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            w = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
            u = tl.dot(xs, tl.trans(w.to(x.dtype))).to(tl.float32)
            top = tl.maximum(top, tl.max(tl.where((rm < M)[None, :], u, float("-inf")), 1))
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            w = tl.load(P + rm[:, None] * D + rd[None, :], mask=(rm < M)[:, None] & (rd < D)[None, :], other=0.0)
            u = tl.dot(xs, tl.trans(w.to(x.dtype))).to(tl.float32)
            tl.store(F + bh * n * M + rows[:, None] * M + rm[None, :], tl.exp(u - top[:, None]),
                     mask=mr[:, None] & (rm < M)[None, :])
        tl.store(LOG + bh * n + rows, top - 0.5 * tl.sum(xf * xf, 1) - log_c, mask=mr)


class Tile(NamedTuple):
    """One kernel's launch: rows (keys or queries) per block ``bn``, features per block ``bm``, Triton's warps and
    pipeline stages."""

    bn: int = 64
    bm: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def launch(self) -> dict:
        return dict(BN=self.bn, BM=self.bm, num_warps=self.num_warps,
                    num_stages=1 if interpreted() else self.num_stages)


#: The kernels' tiles. Each kernel's tile is independent of the others' (the state's partial sums are laid out
#: by their own kernel's ``bm`` and combined before the next kernel reads them); a tile sweep sets these.
TILES: dict[str, Tile] = dict(kv_state=Tile(), out=Tile(), dstate=Tile(), dq=Tile(), dk=Tile(),
                              feature_rows=Tile())


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _splits(n: int, bn: int) -> tuple[int, int]:
    """(splits, keys per split): up to 16 splits of whole blocks of ``bn``."""
    blocks = -(-n // bn)
    sp = min(16, blocks)
    per = -(-blocks // sp) * bn
    return -(-n // per), per


def _map_args(mp: ExpMap, dt):
    """``(W, b or W as a placeholder, rows per head (0: shared), has_b, norm)`` for the kernels."""
    w = mp.weight.detach().to(dt).contiguous()
    b = mp.bias.detach().float().contiguous() if mp.bias is not None else w
    return w, b, (w.shape[-2] if w.dim() == 3 else 0), mp.bias is not None, float(mp.norm)


def _st(x: torch.Tensor) -> tuple[int, int, int]:
    """The batch, head and row strides of ``x [b, h, n, d]`` (its last stride is 1: :func:`_rowmajor`)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rowmajor(x: torch.Tensor, dt) -> torch.Tensor:
    """``x`` in ``dt`` with unit stride along its last dimension, in any layout of the others (the kernels take
    strides: a head-split projection's ``[b, n, h, d]`` view goes in without a copy)."""
    x = x.to(dt)
    return x if x.stride(-1) == 1 else x.contiguous()


def _state(k, v, kmap, valid):
    """``(S [b*hkv, m, dv], z [b*hkv, m], Mg [b*hkv])``: the keys' state at the global maximum ``Mg``."""
    b, hkv, n, d = k.shape
    w, bias, ps, has_b, norm = kmap
    dv, m = v.shape[-1], w.shape[-2]
    t = TILES["kv_state"]
    nmb = -(-m // t.bm)
    sp, per = _splits(n, t.bn)
    BV = _pow2(dv)
    dev = k.device
    SP = torch.empty(b * hkv, nmb, sp, t.bm, BV, dtype=torch.float32, device=dev)
    ZP = torch.empty(b * hkv, nmb, sp, t.bm, dtype=torch.float32, device=dev)
    MP = torch.empty(b * hkv, nmb, sp, dtype=torch.float32, device=dev)
    _kv_state[(b * hkv, nmb, sp)](k, *_st(k), v, *_st(v), w, bias, valid if valid is not None else MP, SP, ZP, MP, n,
                                  hkv, per, m, norm, ps, D=d, DV=dv, BD=_pow2(d), BV=BV, HAS_VALID=valid is not None,
                                  HAS_B=has_b, **t.launch())
    Mg = MP.amax((1, 2))
    Mg = Mg.masked_fill(torch.isinf(Mg), 0.0)
    f = (MP - Mg[:, None, None]).exp()  # exp(-inf) = 0: splits without a key
    S = (SP * f[..., None, None]).sum(2).reshape(b * hkv, nmb * t.bm, BV)[:, :m, :dv].contiguous()
    z = (ZP * f[..., None]).sum(2).reshape(b * hkv, nmb * t.bm)[:, :m].contiguous()
    return S, z, Mg.contiguous()


class _ExpMapAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, qmap, kmap):
        b, hq, n, d = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        S, z, Mg = _state(k, v, kmap, valid)
        w, bias, ps, has_b, norm = qmap
        m = w.shape[-2]
        # token-major [b, n, hq, dv] under the [b, hq, n, dv] view: a module's o_proj reads it without a copy
        out = torch.empty(b, n, hq, dv, dtype=q.dtype, device=q.device).transpose(1, 2)
        rm = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        den = torch.empty_like(rm)
        t = TILES["out"]
        _out[(b * hq, triton.cdiv(n, t.bn))](q, *_st(q), w, bias, S, z, out, *_st(out), rm, den, n, hq // hkv, hq, m,
                                             norm, ps, D=d, DV=dv, BD=_pow2(d), BV=_pow2(dv), HAS_B=has_b,
                                             **t.launch())
        ctx.save_for_backward(q, k, v, valid, S, z, Mg, out, rm, den)
        ctx.maps = qmap, kmap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, valid, S, z, Mg, out, rm, den = ctx.saved_tensors
        (wq, bq, psq, hbq, nq), (wk, bk, psk, hbk, nk) = ctx.maps
        b, hq, n, d = q.shape
        hkv, dv, m = k.shape[1], v.shape[-1], wq.shape[-2]
        dout = _rowmajor(dout, q.dtype)
        delta = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        _delta[(triton.cdiv(n, 64), b * hq)](dout, *_st(dout), out, *_st(out), delta, n, hq, DV=dv, BN=64,
                                             BV=_pow2(dv))
        BV, BD = _pow2(dv), _pow2(d)
        dev = q.device
        t = TILES["dstate"]
        nmb = -(-m // t.bm)
        sp, per = _splits(n, t.bn)
        DSP = torch.empty(b * hkv, nmb, sp, t.bm, BV, dtype=torch.float32, device=dev)
        DZP = torch.empty(b * hkv, nmb, sp, t.bm, dtype=torch.float32, device=dev)
        _dstate[(b * hkv, nmb, sp)](q, *_st(q), wq, bq, dout, *_st(dout), delta, rm, den, DSP, DZP, n, hq // hkv, hq,
                                    per, m, nq, psq, D=d, DV=dv, BD=BD, BV=BV, HAS_B=hbq, **t.launch())
        dS = DSP.sum(2).reshape(b * hkv, nmb * t.bm, BV)[:, :m, :dv].contiguous()
        dz = DZP.sum(2).reshape(b * hkv, nmb * t.bm)[:, :m].contiguous()
        # float32 sums, stored in the inputs' dtype and layout (a projection's view takes them without a copy)
        dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        t = TILES["dq"]
        _dq[(b * hq, triton.cdiv(n, t.bn))](q, *_st(q), wq, bq, S, z, dout, *_st(dout), delta, rm, den, dq, *_st(dq),
                                            n, hq // hkv, hq, m, nq, psq, D=d, DV=dv, BD=BD, BV=BV, HAS_B=hbq,
                                            **t.launch())
        t = TILES["dk"]
        _dk[(b * hkv, triton.cdiv(n, t.bn))](k, *_st(k), v, *_st(v), wk, bk, valid if valid is not None else Mg, Mg,
                                             dS, dz, dk, *_st(dk), dvv, *_st(dvv), n, hkv, m, nk, psk, D=d, DV=dv,
                                             BD=BD, BV=BV, HAS_VALID=valid is not None, HAS_B=hbk, **t.launch())
        return dq, dk, dvv, None, None, None


def exp_map_attention(q, k, v, q_map: ExpMap, k_map: ExpMap, *, key_padding_mask=None) -> torch.Tensor:
    """Non-causal linear attention of ``q [b, hq, n, d]``, ``k [b, hkv, n, d]``, ``v [b, hkv, n, dv]`` with the
    exponential feature maps ``q_map`` (heads: 1 or ``hq``) and ``k_map`` (1 or ``hkv``), the same width ``m``;
    ``key_padding_mask [b, n]`` True = keep; the maps fused into the two GEMMs (see the module docstring;
    :func:`exp_map_fits` says where it runs). Returns ``[b, hq, n, dv]`` in ``v``'s dtype, laid out token-major
    (a view of ``[b, n, hq, dv]``: ``out.transpose(1, 2).reshape(b, n, hq * dv)`` is free). The inputs go in any
    layout with a unit last stride (no copy for the transposed view of a ``[b, n, h * d]`` projection), and their
    gradients come back in the same layout."""
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    valid = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
    out = _ExpMapAttention.apply(_rowmajor(q, dt), _rowmajor(k, dt), _rowmajor(v, dt), valid,
                                 _map_args(q_map, dt), _map_args(k_map, dt))
    return out.to(v.dtype)


def favor_map(projection: torch.Tensor, scale: float) -> ExpMap:
    """FAVOR+'s map (``projection [m, d]`` or ``[heads, m, d]``): ``exp(w.x' - |x'|^2/2)``, ``x' = x
    sqrt(scale)`` (its constant ``1/sqrt(m)`` cancels)."""
    return ExpMap(projection * math.sqrt(scale), None, float(scale))


def favor_attention(q, k, v, projection, *, scale: float, key_padding_mask=None) -> torch.Tensor:
    """Non-causal FAVOR+ attention (the ``performer`` variant): :func:`exp_map_attention` with
    :func:`favor_map` for queries and keys."""
    mp = favor_map(projection, scale)
    return exp_map_attention(q, k, v, mp, mp, key_padding_mask=key_padding_mask)


class _FeatureRows(torch.autograd.Function):
    """FAVOR+'s feature rows on the kernel; the backward in PyTorch (``du = dF * F``: two GEMMs and the norm
    term's row sum), as the unfused form's."""

    @staticmethod
    def forward(ctx, x, projection, scale):
        b, h, n, d = x.shape
        m = projection.shape[-2]
        w = projection.detach().to(x.dtype).contiguous()
        xc = x.contiguous()
        feats = torch.empty(b, h, n, m, dtype=x.dtype, device=x.device)
        log = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
        hp = w.shape[0] if w.dim() == 3 else 1
        ps = m if w.dim() == 3 else 0
        t = TILES["feature_rows"]
        _feature_rows[(triton.cdiv(n, t.bn), b * h)](xc, w, feats, log, n, hp, m, math.sqrt(scale),
                                                      0.5 * math.log(m), ps, D=d, BD=_pow2(d),
                                                      **t._replace(bm=min(t.bm, _pow2(m))).launch())
        ctx.save_for_backward(xc, projection, feats)
        ctx.scale = scale
        return feats, log

    @staticmethod
    def backward(ctx, dfeats, dlog):
        x, projection, feats = ctx.saved_tensors
        r = math.sqrt(ctx.scale)
        xs = x * r
        p = projection.to(x.dtype)
        du = dfeats * feats if dfeats is not None else torch.zeros_like(feats)
        eq = ("bhnm,md->bhnd", "bhnm,bhnd->md") if p.dim() == 2 else ("bhnm,hmd->bhnd", "bhnm,bhnd->hmd")
        dxs = torch.einsum(eq[0], du, p)
        if dlog is not None:  # log = max(u) (detached) - |x'|^2 / 2 - log(sqrt(m))
            dxs = dxs - xs * dlog.to(x.dtype)[..., None]
        dp = torch.einsum(eq[1], du, xs).to(projection.dtype) if ctx.needs_input_grad[1] else None
        return dxs * r, dp, None


def feature_rows_fit(x: torch.Tensor, projection: torch.Tensor) -> bool:
    """Whether :func:`favor_features` sends these to :func:`favor_feature_rows`: Triton on CUDA, head dim
    16-128, a projection of that width (shared, or one per head), 16- or 32-bit floats. (On the CPU the kernel
    runs only when called directly under Triton's interpreter: the tests.)"""
    return (triton is not None and x.is_cuda and 16 <= x.shape[-1] <= 128
            and projection.shape[-1] == x.shape[-1] and x.dtype != torch.float64
            and (projection.dim() == 2 or projection.shape[0] == x.shape[1]))


def favor_feature_rows(x: torch.Tensor, projection: torch.Tensor, scale: float):
    """:func:`attnzoo.variants.feature_maps.favor_features` with the ``[.., m]`` rows written once (one kernel:
    the GEMM, the row maximum and the exponential in registers): ``(exp(w.x' - t), t - |x'|^2 / 2 -
    log(sqrt(m)))``, ``t`` the row's largest ``w.x'`` (detached); ``x [b, h, n, d]``, ``projection [m, d]`` or
    ``[h, m, d]``. Check :func:`feature_rows_fit` first."""
    return _FeatureRows.apply(x, projection, scale)
