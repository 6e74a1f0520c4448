"""The ``triton`` backend of the LSH op: the whole op past the sort, fused (forward and backward).

After the sort the pattern is fixed: sorted query chunk ``c`` of a round reads the sorted key chunks ``c`` and
``c - 1`` (cyclically). The kernels take ``q``, ``k``, ``v`` in their original order (any strides with a contiguous
last dim: views of one projection are read in place) and the sort permutations ``[batch, heads, rounds, n]``, and
load every row through them (pointer indirection: no sorted copies, no gathers, no inverse permutation):

* :func:`_fwd`: one program per (query chunk, batch x head x round) loads its queries and walks two key chunks with
  an online softmax (FlashAttention-2), the masks read from the original positions (the permutation's values:
  causality, padding, the own key). It writes the round's output and natural log-sum-exp straight back in original
  order (each (round, position) is written once: no atomics).
* :func:`_combine`: one pass over the rounds: ``out = sum_r softmax_r(lse_r) o_r`` (plus separate QK's own key),
  and the combined log-sum-exp ``L``: elementwise, no batched matmul.
* The backward needs neither the rounds' outputs nor their log-sum-exps: with ``w_r = exp(lse_r - L)``, the
  gradient reaching round ``r`` is ``dO_r = w_r dO`` and ``dlse_r = w_r (dO . o_r - dO . out)``, so the usual
  ``delta_r = rowsum(dO_r o_r) - dlse_r = w_r rowsum(dO out)`` and ``P_r (dO_r V - delta_r) = P' (dO V - D)`` with
  ``P' = exp(s - L)`` and ``D = rowsum(dO out)``: FlashAttention's backward of one softmax over everything the
  rounds read. :func:`_bwd_prep` computes ``D``; :func:`_bwd` runs one program per (chunk, batch x head x round):
  dQ of query chunk ``c`` (key chunks ``c``, ``c - 1``) and dK/dV of key chunk ``c`` (query chunks ``c``,
  ``c + 1``), the diagonal block computed once for both; it writes per-round partial gradients in original order
  (once each, no atomics; separate QK's own key in round 0's), which :func:`_finish` sums over the rounds (and the
  query heads of a KV head).

The chunk is one tile (``BLOCK``: the chunk rounded up to a power of two, at least 16). :func:`_hash` is the fused
hash (one GEMM + argmax). Tested under Triton's interpreter on the CPU against the float64 reference
(tests/test_reformer_ops.py) and compiled on the GPU (``-m gpu``).
"""
from __future__ import annotations

import math

import torch

from .naive import SELF_SCORE
from ..custom_ops import kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch backend serves without Triton
    triton = None

__all__ = ["available", "lsh_fused_attention", "hash_buckets"]


def available(device_type: str) -> str | None:
    """None if the kernels can run on ``device_type`` here, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    from ..sparse.triton_kernel.kernels import available as _available

    return _available(device_type)


if triton is not None:
    from ..sparse.triton_kernel import kernels as _sparse_kernels  # noqa: F401  (the interpreter's index shim)

    @triton.jit
    def _scores(q, k, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL: tl.constexpr, SELF: tl.constexpr,
                HAS_KEEP: tl.constexpr):
        s = tl.dot(q, tl.trans(k)) * scale
        valid = rmask[:, None] & cmask[None, :]
        if HAS_KEEP:
            valid = valid & (kk[None, :] != 0)
        if CAUSAL:
            valid = valid & (kp[None, :] <= qp[:, None])
        own = kp[None, :] == qp[:, None]
        if SELF == 1:
            s = tl.where(own, self_score, s)
        else:
            valid = valid & (own == 0)
        return tl.where(valid, s, float("-inf")), own

    @triton.jit
    def _rows(PERM, z, n, chunk, C: tl.constexpr, BLOCK: tl.constexpr, two):
        """Original positions of sorted chunk ``chunk`` of row ``z`` of a permutation (0 where masked), the mask.
        ``two = 0`` masks the whole chunk (a neighbour chunk of a round that is one chunk: read once)."""
        offs = tl.arange(0, BLOCK)
        idx = chunk * C + offs
        mask = (offs < C) & (idx < n) & (offs < C * two)
        pos = tl.load(PERM + z * n + idx, mask=mask, other=0).to(tl.int64)
        return pos, mask

    @triton.jit
    def _load_rows(X, base, pos, mask, stride, od, D: tl.constexpr):
        return tl.load(X + base + pos[:, None] * stride + od[None, :], mask=mask[:, None] & (od[None, :] < D),
                       other=0.0)

    @triton.jit
    def _fwd(Q, K, V, QPERM, KPERM, KPM, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, n, nc, two, H, R, G,
             scale, self_score, C: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
             DV: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr, SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        c = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)  # (batch, head, round)
        bh = z // R
        bb = bh // H
        hk = (bh % H) // G
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        qp, rmask = _rows(QPERM, z, n, c, C, BLOCK, 1)
        q = _load_rows(Q, bb * sqb + (bh % H) * sqh, qp, rmask, sqn, od, D)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BDV], tl.float32)
        for t in tl.static_range(2):
            kp, cmask = _rows(KPERM, z, n, (c - t + nc) % nc, C, BLOCK, 1 - t + t * two)  # t = 1: two
            k = _load_rows(K, bb * skb + hk * skh, kp, cmask, skn, od, D)
            v = _load_rows(V, bb * svb + hk * svh, kp, cmask, svn, odv, DV)
            kk = kp
            if HAS_KEEP:
                kk = tl.load(KPM + bb * n + kp, mask=cmask, other=0)
            s, own = _scores(q, k, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL, SELF, HAS_KEEP)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        some = l_i > 0
        o = acc / tl.where(some, l_i, 1.0)[:, None]
        lse = tl.where(some, m_i + tl.log(tl.where(some, l_i, 1.0)), float("-inf"))
        tl.store(O + z * n * DV + qp[:, None] * DV + odv[None, :], o.to(O.dtype.element_ty),
                 mask=rmask[:, None] & (odv[None, :] < DV))
        tl.store(LSE + z * n + qp, lse, mask=rmask)

    @triton.jit
    def _combine(O, LSE, OUT, STATS, Q, K, V, KPM, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, n, H, R, G, scale,
                 own_bias, bhn, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr,
                 BDV: tl.constexpr, OWN: tl.constexpr, HAS_KEEP: tl.constexpr):
        """``out = sum_r softmax_r(lse_r) o_r`` and ``L = logsumexp_r lse_r`` for a block of rows, ``L`` kept as
        ``(m, log l)`` (``STATS [2, b, h, n]``: the largest term, 0 if none, and the log of the sum of the terms
        relative to it, ``+inf`` if none): ``exp(s - m - log l)`` stays exact where ``s`` and ``L`` are both near
        the shared-QK own score -1e5, which ``exp(s - L)`` in float32 is not. ``OWN``: one more term, the row's own
        key (score ``q . k scale + own_bias``, value its own ``v``)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bb = bh // H
        hk = (bh % H) // G
        rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)  # times the strides of q, k, v
        rmask = rows < n
        odv = tl.arange(0, BDV)
        m = tl.full([BM], float("-inf"), tl.float32)
        for r in range(R):
            m = tl.maximum(m, tl.load(LSE + (bh * R + r) * n + rows, mask=rmask, other=float("-inf")))
        if OWN:
            od = tl.arange(0, BD)
            q = _load_rows(Q, bb * sqb + (bh % H) * sqh, rows, rmask, sqn, od, D).to(tl.float32)
            k = _load_rows(K, bb * skb + hk * skh, rows, rmask, skn, od, D).to(tl.float32)
            s_own = tl.sum(q * k, 1) * scale + own_bias
            if HAS_KEEP:
                s_own = tl.where(tl.load(KPM + bb * n + rows, mask=rmask, other=0) != 0, s_own, float("-inf"))
            m = tl.maximum(m, s_own)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BDV], tl.float32)
        for r in range(R):
            w = tl.exp(tl.load(LSE + (bh * R + r) * n + rows, mask=rmask, other=float("-inf")) - m_safe)
            o = tl.load(O + (bh * R + r) * n * DV + rows[:, None] * DV + odv[None, :],
                        mask=rmask[:, None] & (odv[None, :] < DV), other=0.0)
            acc += w[:, None] * o.to(tl.float32)
            l_i += w
        if OWN:
            w = tl.exp(s_own - m_safe)
            acc += w[:, None] * _load_rows(V, bb * svb + hk * svh, rows, rmask, svn, odv, DV).to(tl.float32)
            l_i += w
        some = l_i > 0
        out = acc / tl.where(some, l_i, 1.0)[:, None]
        tl.store(OUT + bh * n * DV + rows[:, None] * DV + odv[None, :], out.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & (odv[None, :] < DV))
        tl.store(STATS + bh * n + rows, m_safe, mask=rmask)
        tl.store(STATS + bhn + bh * n + rows, tl.where(some, tl.log(tl.where(some, l_i, 1.0)), float("inf")),
                 mask=rmask)

    @triton.jit
    def _bwd_prep(GO, OUT, DELTA, n, BM: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr):
        """``D = rowsum(dO * out)`` (float32) for a block of rows."""
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < n
        odv = tl.arange(0, BDV)
        ptr = bh * n * DV + rows[:, None] * DV + odv[None, :]
        mask = rmask[:, None] & (odv[None, :] < DV)
        g = tl.load(GO + ptr, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(OUT + ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * n + rows, tl.sum(g * o, 1), mask=rmask)

    @triton.jit
    def _bwd_block(q, k, v, g, mx, logl, delta, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL: tl.constexpr,
                   SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        """``(P', dS)`` of one (query chunk, key chunk) block: ``P' = exp(s - L)``, ``dS = P' (dO V - D)``."""
        s, own = _scores(q, k, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL, SELF, HAS_KEEP)
        p = tl.exp((s - mx[:, None]) - logl[:, None])
        dp = tl.dot(g, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SELF == 1:
            ds = tl.where(own, 0.0, ds)  # a constant score: no gradient
        return p, ds

    @triton.jit
    def _bwd(Q, K, V, QPERM, KPERM, KPM, GO, STATS, DELTA, DQ, DK, DV_, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
             n, nc, two, H, R, G, scale, self_score, bhn, own_bias, C: tl.constexpr, BLOCK: tl.constexpr,
             D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr,
             SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        c = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)
        bh = z // R
        bb = bh // H
        hk = (bh % H) // G
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        qbase, kbase, vbase = bb * sqb + (bh % H) * sqh, bb * skb + hk * skh, bb * svb + hk * svh
        # query chunk c and key chunk c
        qp, rmask = _rows(QPERM, z, n, c, C, BLOCK, 1)
        q = _load_rows(Q, qbase, qp, rmask, sqn, od, D)
        g = tl.load(GO + bh * n * DV + qp[:, None] * DV + odv[None, :], mask=rmask[:, None] & (odv[None, :] < DV),
                    other=0.0)
        mx = tl.load(STATS + bh * n + qp, mask=rmask, other=0.0)
        logl = tl.load(STATS + bhn + bh * n + qp, mask=rmask, other=float("inf"))  # +inf: read nothing, P' = 0
        delta = tl.load(DELTA + bh * n + qp, mask=rmask, other=0.0)
        kp, cmask = _rows(KPERM, z, n, c, C, BLOCK, 1)
        k = _load_rows(K, kbase, kp, cmask, skn, od, D)
        v = _load_rows(V, vbase, kp, cmask, svn, odv, DV)
        kk = kp
        if HAS_KEEP:
            kk = tl.load(KPM + bb * n + kp, mask=cmask, other=0)
        p, ds = _bwd_block(q, k, v, g, mx, logl, delta, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL, SELF,
                           HAS_KEEP)
        dv = tl.dot(tl.trans(p).to(g.dtype), g)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q)
        dq = tl.dot(ds.to(k.dtype), k)
        # query chunk c reads key chunk c - 1 (two = 0: the round is one chunk, read once)
        kp2, cmask2 = _rows(KPERM, z, n, (c - 1 + nc) % nc, C, BLOCK, two)
        k2 = _load_rows(K, kbase, kp2, cmask2, skn, od, D)
        v2 = _load_rows(V, vbase, kp2, cmask2, svn, odv, DV)
        kk2 = kp2
        if HAS_KEEP:
            kk2 = tl.load(KPM + bb * n + kp2, mask=cmask2, other=0)
        p2, ds2 = _bwd_block(q, k2, v2, g, mx, logl, delta, qp, kp2, kk2, rmask, cmask2, scale, self_score, CAUSAL,
                             SELF, HAS_KEEP)
        dq += tl.dot(ds2.to(k2.dtype), k2)
        # key chunk c is read by query chunk c + 1
        qp3, rmask3 = _rows(QPERM, z, n, (c + 1) % nc, C, BLOCK, two)
        q3 = _load_rows(Q, qbase, qp3, rmask3, sqn, od, D)
        g3 = tl.load(GO + bh * n * DV + qp3[:, None] * DV + odv[None, :],
                     mask=rmask3[:, None] & (odv[None, :] < DV), other=0.0)
        mx3 = tl.load(STATS + bh * n + qp3, mask=rmask3, other=0.0)
        logl3 = tl.load(STATS + bhn + bh * n + qp3, mask=rmask3, other=float("inf"))
        delta3 = tl.load(DELTA + bh * n + qp3, mask=rmask3, other=0.0)
        p3, ds3 = _bwd_block(q3, k, v, g3, mx3, logl3, delta3, qp3, kp, kk, rmask3, cmask, scale, self_score, CAUSAL,
                             SELF, HAS_KEEP)
        dv += tl.dot(tl.trans(p3).to(g3.dtype), g3)
        dk += tl.dot(tl.trans(ds3).to(q3.dtype), q3)
        if SELF == 2:  # separate QK's own key (score q.k scale + own_bias), once: in the partials of round 0
            first = (tl.zeros([BLOCK], tl.int64) + z % R) == 0
            om = rmask & first  # the queries of chunk c and their own keys
            ko = _load_rows(K, kbase, qp, om, skn, od, D).to(tl.float32)
            vo = _load_rows(V, vbase, qp, om, svn, odv, DV).to(tl.float32)
            so = tl.sum(q.to(tl.float32) * ko, 1) * scale + own_bias
            if HAS_KEEP:
                so = tl.where(tl.load(KPM + bb * n + qp, mask=om, other=0) != 0, so, float("-inf"))
            po = tl.where(om, tl.exp((so - mx) - logl), 0.0)
            dq += (po * (tl.sum(g.to(tl.float32) * vo, 1) - delta))[:, None] * ko
            km = cmask & first  # the keys of chunk c and their own queries
            qo = _load_rows(Q, qbase, kp, km, sqn, od, D).to(tl.float32)
            go = tl.load(GO + bh * n * DV + kp[:, None] * DV + odv[None, :], mask=km[:, None] & (odv[None, :] < DV),
                         other=0.0).to(tl.float32)
            mxo = tl.load(STATS + bh * n + kp, mask=km, other=0.0)
            loglo = tl.load(STATS + bhn + bh * n + kp, mask=km, other=float("inf"))
            deltao = tl.load(DELTA + bh * n + kp, mask=km, other=0.0)
            sk = tl.sum(qo * k.to(tl.float32), 1) * scale + own_bias
            if HAS_KEEP:
                sk = tl.where(kk != 0, sk, float("-inf"))
            pk = tl.where(km, tl.exp((sk - mxo) - loglo), 0.0)
            dk += (pk * (tl.sum(go * v.to(tl.float32), 1) - deltao))[:, None] * qo
            dv += pk[:, None] * go
        # per-round partials, in original order (each (round, position) written once)
        tl.store(DQ + z * n * D + qp[:, None] * D + od[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=rmask[:, None] & (od[None, :] < D))
        tl.store(DK + z * n * D + kp[:, None] * D + od[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=cmask[:, None] & (od[None, :] < D))
        tl.store(DV_ + z * n * DV + kp[:, None] * DV + odv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=cmask[:, None] & (odv[None, :] < DV))

    @triton.jit
    def _finish(P, OUT, n, H, R, G, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
        """``OUT[b, j] = sum over the G heads h of group j and the R rounds of P[b, h, r]`` for a block of rows
        (``P [b, H, R, n, D]``, ``OUT [b, H / G, n, D]``)."""
        pid = tl.program_id(0)
        bj = tl.program_id(1).to(tl.int64)
        hj = H // G
        bb = bj // hj
        j = bj % hj
        rows = pid * BM + tl.arange(0, BM)
        od = tl.arange(0, BD)
        mask = (rows[:, None] < n) & (od[None, :] < D)
        acc = tl.zeros([BM, BD], tl.float32)
        for t in range(G * R):
            z = (bb * H + j * G + t // R) * R + t % R
            acc += tl.load(P + z * n * D + rows[:, None] * D + od[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + bj * n * D + rows[:, None] * D + od[None, :], acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _hash(X, E, ROT, OUT, sxb, sxh, sxn, n, H, NB2, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, ROUNDS: tl.constexpr, EXTRA: tl.constexpr):
        """Buckets of one block of rows for every round: ``argmax([x R; -x R])`` as a running max and min over
        column blocks of ``x R`` (the projection is never written). ``EXTRA``: the vectors are ``[x, e]``
        (``E [b, h, n]``; ``ROT`` has ``D + 1`` rows, the last one for ``e``)."""
        pid = tl.program_id(0)
        zh = tl.program_id(1).to(tl.int64)
        h = zh % H
        rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < n
        od = tl.arange(0, BD)
        x = tl.load(X + (zh // H) * sxb + h * sxh + rows[:, None] * sxn + od[None, :],
                    mask=rmask[:, None] & (od[None, :] < D), other=0.0).to(ROT.dtype.element_ty)
        if EXTRA:
            e = tl.load(E + zh * n + rows, mask=rmask, other=0.0)
        for r in range(ROUNDS):
            best = tl.full([BM], float("-inf"), tl.float32)
            worst = tl.full([BM], float("inf"), tl.float32)
            best_i = tl.zeros([BM], tl.int32)
            worst_i = tl.zeros([BM], tl.int32)
            for c0 in range(0, NB2, BN):
                cols = c0 + tl.arange(0, BN)
                cmask = cols < NB2
                rot = ROT + h * (D + EXTRA) * ROUNDS * NB2 + r * NB2  # rows of D (+ 1) x (ROUNDS x NB2)
                w = tl.load(rot + od[:, None] * ROUNDS * NB2 + cols[None, :], mask=(od[:, None] < D) & cmask[None, :],
                            other=0.0)
                p = tl.dot(x, w)
                if EXTRA:
                    w_e = tl.load(rot + D * ROUNDS * NB2 + cols, mask=cmask, other=0.0)
                    p += e[:, None] * w_e[None, :]
                hi = tl.where(cmask[None, :], p, float("-inf"))
                lo = tl.where(cmask[None, :], p, float("inf"))
                bm, bi = tl.max(hi, 1, return_indices=True)
                wm, wi = tl.min(lo, 1, return_indices=True)
                up = bm > best
                best_i = tl.where(up, bi + c0, best_i)
                best = tl.where(up, bm, best)
                dn = wm < worst
                worst_i = tl.where(dn, wi + c0, worst_i)
                worst = tl.where(dn, wm, worst)
            bucket = tl.where(best >= -worst, best_i, worst_i + NB2)
            tl.store(OUT + zh * ROUNDS * n + r * n + rows, bucket.to(tl.int64), mask=rmask)


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_ROWS = 64  # rows per program of the row-wise kernels (combine, prep, finish)


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a contiguous last dim (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q, v, chunk, causal, self_mode, has_keep):
    block = _pow2(chunk)
    return dict(C=chunk, BLOCK=block, D=q.shape[3], BD=_pow2(q.shape[3]), DV=v.shape[3], BDV=_pow2(v.shape[3]),
                CAUSAL=causal, SELF=self_mode, HAS_KEEP=has_keep, num_warps=4 if block <= 64 else 8)


def _strides(q, k, v):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2))


def _keep(kpm: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return q.new_zeros(1, dtype=torch.int8) if kpm is None else kpm


def fwd_rounds(q, k, v, q_perm, k_perm, kpm, chunk: int, causal: bool, self_mode: int, scale: float):
    """Stage 1 of the forward: each round's chunk attention, ``(o_r [b, h, r, n, dv], lse_r [b, h, r, n] float32)``
    in original order (``kpm``: int8 ``[b, n]`` or None)."""
    b, h, n, _ = q.shape
    r = q_perm.shape[2]
    nc = _cdiv(n, chunk)
    meta = _meta(q, v, chunk, causal, self_mode, kpm is not None)
    o_r = torch.empty(b, h, r, n, v.shape[3], device=q.device, dtype=q.dtype)
    lse_r = torch.empty(b, h, r, n, device=q.device, dtype=torch.float32)
    _fwd[(nc, b * h * r)](q, k, v, q_perm, k_perm, _keep(kpm, q), o_r, lse_r, *_strides(q, k, v), n, nc, int(nc > 1),
                          h, r, h // k.shape[1], float(scale), SELF_SCORE, **meta)
    return o_r, lse_r


def fwd_combine(o_r, lse_r, q, k, v, kpm, self_mode: int, scale: float, own_bias: float):
    """Stage 2 of the forward: ``(out [b, h, n, dv], stats [2, b, h, n] float32)``, the rounds combined (and separate
    QK's own key); ``stats``: the combined log-sum-exp as ``(m, log l)`` (see :func:`_combine`)."""
    from .chunked import SEPARATE

    b, h, r, n, dv = o_r.shape
    out = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
    stats = torch.empty(2, b, h, n, device=q.device, dtype=torch.float32)
    _combine[(_cdiv(n, _ROWS), b * h)](o_r, lse_r, out, stats, q, k, v, _keep(kpm, q), *_strides(q, k, v), n, h, r,
                                       h // k.shape[1], float(scale), float(own_bias), b * h * n, BM=_ROWS,
                                       D=q.shape[3], BD=_pow2(q.shape[3]), DV=dv, BDV=_pow2(dv),
                                       OWN=self_mode == SEPARATE, HAS_KEEP=kpm is not None, num_warps=4)
    return out, stats


def _fwd_impl(q, k, v, q_perm, k_perm, kpm, chunk: int, causal: bool, self_mode: int, scale: float,
              own_bias: float):
    """``(out, stats)``: :func:`fwd_rounds` then :func:`fwd_combine`."""
    o_r, lse_r = fwd_rounds(q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode, scale)
    return fwd_combine(o_r, lse_r, q, k, v, kpm, self_mode, scale, own_bias)


def bwd_delta(g, out):
    """Stage 1 of the backward: ``D = rowsum(dO * out)`` float32 ``[b, h, n]`` (``g`` contiguous)."""
    b, h, n, dv = out.shape
    delta = torch.empty(b, h, n, device=out.device, dtype=torch.float32)
    _bwd_prep[(_cdiv(n, _ROWS), b * h)](g, out, delta, n, BM=_ROWS, DV=dv, BDV=_pow2(dv), num_warps=4)
    return delta


def bwd_rounds(q, k, v, q_perm, k_perm, kpm, stats, g, delta, chunk: int, causal: bool, self_mode: int,
               scale: float, own_bias: float):
    """Stage 2 of the backward: each round's dQ, dK, dV (``[b, h, r, n, d]``, per query head, original order;
    separate QK's own key in round 0's)."""
    b, h, n, _ = q.shape
    r = q_perm.shape[2]
    nc = _cdiv(n, chunk)
    meta = _meta(q, v, chunk, causal, self_mode, kpm is not None)
    meta["num_warps"] = 4 if meta["BLOCK"] <= 64 else 8  # H100 sweep at the issue shape: 4 warps 1.99 ms, 8 2.49
    dq_r = torch.empty(b, h, r, n, q.shape[3], device=q.device, dtype=q.dtype)
    dk_r = torch.empty(b, h, r, n, k.shape[3], device=q.device, dtype=k.dtype)
    dv_r = torch.empty(b, h, r, n, v.shape[3], device=q.device, dtype=v.dtype)
    _bwd[(nc, b * h * r)](q, k, v, q_perm, k_perm, _keep(kpm, q), g, stats, delta, dq_r, dk_r, dv_r,
                          *_strides(q, k, v), n, nc, int(nc > 1), h, r, h // k.shape[1], float(scale), SELF_SCORE,
                          b * h * n, float(own_bias), **meta)
    return dq_r, dk_r, dv_r


def bwd_sum(parts, kv_heads: int):
    """Stage 3 of the backward: ``(dq, dk, dv)``, the partials summed over the rounds (and the query heads of a KV
    head for dK/dV)."""
    dq_r = parts[0]
    b, h, r, n, _ = dq_r.shape
    grads = []
    for part, heads in zip(parts, (h, kv_heads, kv_heads)):
        out = torch.empty(b, heads, n, part.shape[4], device=part.device, dtype=part.dtype)
        _finish[(_cdiv(n, _ROWS), b * heads)](part, out, n, h, r, h // heads, BM=_ROWS, D=part.shape[4],
                                               BD=_pow2(part.shape[4]), num_warps=4)
        grads.append(out)
    return grads


def _bwd_impl(q, k, v, q_perm, k_perm, kpm, out, stats, g, chunk: int, causal: bool, self_mode: int, scale: float,
              own_bias: float):
    """``(dq, dk, dv)`` from ``dO = g`` (see the module docstring: only the combined ``out`` and ``stats``):
    :func:`bwd_delta`, :func:`bwd_rounds`, :func:`bwd_sum`."""
    g = g.to(out.dtype).contiguous()  # a compiled graph may hand a float32 gradient for a 16-bit output
    delta = bwd_delta(g, out)
    parts = bwd_rounds(q, k, v, q_perm, k_perm, kpm, stats, g, delta, chunk, causal, self_mode, scale, own_bias)
    return tuple(bwd_sum(parts, k.shape[1]))


class _LSHFused(torch.autograd.Function):
    """The eager route: one autograd node for the whole op past the sort."""

    @staticmethod
    def forward(ctx, q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode, scale, own_bias):
        out, stats = _fwd_impl(q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode, scale, own_bias)
        ctx.save_for_backward(q, k, v, q_perm, k_perm, kpm, out, stats)
        ctx.args = (chunk, causal, self_mode, scale, own_bias)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, g, _dlse):
        q, k, v, q_perm, k_perm, kpm, out, stats = ctx.saved_tensors
        dq, dk, dv = _bwd_impl(q, k, v, q_perm, k_perm, kpm, out, stats, g, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------- the custom ops (torch.compile)
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_perm: torch.Tensor, k_perm: torch.Tensor,
            kpm: torch.Tensor | None, chunk: int, causal: bool, self_mode: int, scale: float, own_bias: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attnzoo::lsh_fwd``: ``(out, stats)``."""
    return _fwd_impl(q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode, scale, own_bias)


def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_perm: torch.Tensor, k_perm: torch.Tensor,
            kpm: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, chunk: int,
            causal: bool, self_mode: int, scale: float, own_bias: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attnzoo::lsh_bwd``: ``(dq, dk, dv)``."""
    return _bwd_impl(q, k, v, q_perm, k_perm, kpm, out, stats, g, chunk, causal, self_mode, scale, own_bias)


def _fwd_fake(q, k, v, q_perm, *args):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[3])), q.new_empty((2, b, h, n), dtype=torch.float32)


def _bwd_fake(q, k, v, *args):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, q_perm, k_perm, kpm, *args = inputs
    ctx.save_for_backward(q, k, v, q_perm, k_perm, kpm, *output)
    ctx.args = tuple(args)


def _op_backward(ctx, g, _dlse):
    q, k, v, q_perm, k_perm, kpm, out, stats = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnzoo.lsh_bwd(q, k, v, q_perm, k_perm, kpm, out, stats, g, *ctx.args)
    return (dq, dk, dv) + (None,) * (3 + len(ctx.args))


_OPS: dict = {}


def _register_ops() -> None:
    """``attnzoo::lsh_fwd`` / ``attnzoo::lsh_bwd`` (``torch.library.custom_op`` with fake implementations, the
    autograd registered): what ``torch.compile`` traces, opaque to Inductor, for CUDA graphs to capture."""
    if triton is None:
        return
    ops = {"fwd": kernel_op("lsh_fwd", _fwd_op, _fwd_fake, backward=_op_backward, setup_context=_setup_context),
           "bwd": kernel_op("lsh_bwd", _bwd_op, _bwd_fake),
           "hash": kernel_op("lsh_hash", _hash_impl, lambda x, rot, extra: x.new_empty(
               (*x.shape[:2], rot.shape[2], x.shape[2]), dtype=torch.int64))}
    _OPS.update({k: op for k, op in ops.items() if op is not None})



def hash_buckets(x: torch.Tensor, rot: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax([x R; -x R])`` of ``x [b, h, n, d]`` (any strides with a contiguous last dim, any float dtype: cast
    to the rotations' in the kernel) and rotations ``rot [h, d, rounds, nb / 2]`` fused (one pass over ``x``, the
    projection never written): int64 ``[b, h, rounds, n]``, as :func:`attnzoo.ops.lsh.hashing.hash_vectors`.
    ``extra [b, h, n]``: the vectors are ``[x, extra]`` (``rot`` then has ``d + 1`` rows). Inside
    ``torch.compile``: the custom op ``attnzoo::lsh_hash``."""
    why = available(x.device.type)
    if why is not None:
        raise RuntimeError(f"the LSH Triton kernel cannot run: {why}")
    if torch.compiler.is_compiling() and "hash" in _OPS:
        return torch.ops.attnzoo.lsh_hash(x, rot, extra)
    return _hash_impl(x, rot, extra)


def _hash_impl(x: torch.Tensor, rot: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``attnzoo::lsh_hash``: the fused hash kernel's launch."""
    b, h, n, d = x.shape
    rounds, nb2 = rot.shape[2], rot.shape[3]
    x = _rowwise(x)
    rot = rot.contiguous()
    e = extra.to(rot.dtype).contiguous() if extra is not None else rot
    out = torch.empty(b, h, rounds, n, device=x.device, dtype=torch.int64)
    bm = 64
    _hash[(_cdiv(n, bm), b * h)](x, e, rot, out, x.stride(0), x.stride(1), x.stride(2), n, h, nb2, D=d,
                                 BD=_pow2(d), BM=bm, BN=min(128, _pow2(nb2)), ROUNDS=rounds,
                                 EXTRA=int(extra is not None), num_warps=4)
    return out


def lsh_fused_attention(q, k, v, q_perm, k_perm, key_padding_mask, *, chunk: int, causal: bool, self_mode: int,
                        scale: float, return_lse: bool = False, compiled: bool | None = None):
    """The op past the sort, fused: ``out [b, h, n, dv]``, with ``return_lse`` ``(out, lse [b, h, n] float32)``
    (``lse``: the log-sum-exp of the combined softmax, ``-inf`` for a row that read nothing; not differentiable).

    Args:
        q: ``[b, h, n, d]``; k, v: ``[b, kv_heads, n, d]`` (any strides with a contiguous last dim).
        q_perm, k_perm: int64 ``[b, h, rounds, n]``: each round's sort, sorted rank -> original position (the same
            tensor for shared QK).
        key_padding_mask: bool ``[b, n]`` (True = real token) or None.
        self_mode: :data:`~attnzoo.ops.lsh.chunked.SHARED` or ``SEPARATE`` (separate QK adds the own key as one
            more term weighted as ``rounds`` copies).
        compiled: take the custom ops ``attnzoo::lsh_fwd``/``lsh_bwd`` (default: inside ``torch.compile`` only;
            True in eager too, for tests); else one ``autograd.Function`` (less host time in eager).
    """
    why = available(q.device.type)
    if why is not None:
        raise RuntimeError(f"the LSH Triton kernel cannot run: {why}")
    q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
    q_perm, k_perm = q_perm.contiguous(), k_perm.contiguous()
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    own_bias = math.log(q_perm.shape[2])
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    if compiled and "fwd" in _OPS:
        out, stats = torch.ops.attnzoo.lsh_fwd(q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode,
                                               float(scale), own_bias)
    else:
        out, stats = _LSHFused.apply(q, k, v, q_perm, k_perm, kpm, chunk, causal, self_mode, float(scale), own_bias)
    if not return_lse:
        return out
    return out, (stats[0] + stats[1]).nan_to_num(nan=float("-inf"), posinf=float("-inf"))


_register_ops()
