"""The ``triton`` backend of the LSH op: attention within chunks of the sorted rounds, fused (forward and
backward), the arguments and results of :func:`attnzoo.ops.lsh.chunked.chunk_attention`.

After the sort the pattern is fixed: sorted query chunk ``c`` reads the key chunks ``c`` and ``c - 1`` (cyclically).
So one program per (query chunk, batch x head x round) loads its queries and walks two key chunks with an online
softmax (FlashAttention-2), the masks read from the original positions gathered beside the rows (causality,
padding, the own key); no layout, no index table, nothing of size ``n x n``. It writes the output and the natural
log-sum-exp, which the op needs to combine the rounds, and its backward takes the gradient of both
(``delta = rowsum(dO * O) - dLSE``): one dQ program per query chunk, one dK/dV program per key chunk (which the
query chunks ``c`` and ``c + 1`` read). The chunk is one tile (``BLOCK``: the chunk rounded up to a power of two,
at least 16). Tested under Triton's interpreter on the CPU against the float64 reference
(tests/test_reformer_ops.py) and compiled on the GPU (``-m gpu``).
"""
from __future__ import annotations

import os

import torch

from .naive import SELF_SCORE

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch backend serves without Triton
    triton = None

__all__ = ["available", "lsh_chunk_attention"]


def available(device_type: str) -> str | None:
    """None if the kernels can run on ``device_type`` here, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's interpreter), inputs are on {device_type}"
    return None


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
    def _fwd(Q, K, V, QP, KP, KK, O, LSE, n, nc, two, scale, self_score, C: tl.constexpr, BLOCK: tl.constexpr,
             D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr,
             SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        c = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        rows = c * C + offs
        rmask = (offs < C) & (rows < n)
        q = tl.load(Q + z * n * D + rows[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        qp = tl.load(QP + z * n + rows, mask=rmask, other=-1)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BDV], tl.float32)
        for t in tl.static_range(2):
            kc = (c - t + nc) % nc
            cols = kc * C + offs
            cmask = (offs < C) & (cols < n)
            if t == 1:  # the chunk before (after); two = 0: the round is one chunk, read once
                cmask = cmask & (offs < C * two)
            k = tl.load(K + z * n * D + cols[:, None] * D + od[None, :], mask=cmask[:, None] & (od[None, :] < D),
                        other=0.0)
            v = tl.load(V + z * n * DV + cols[:, None] * DV + odv[None, :],
                        mask=cmask[:, None] & (odv[None, :] < DV), other=0.0)
            kp = tl.load(KP + z * n + cols, mask=cmask, other=-1)
            kk = kp
            if HAS_KEEP:
                kk = tl.load(KK + z * n + cols, mask=cmask, other=0)
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
        tl.store(O + z * n * DV + rows[:, None] * DV + odv[None, :], o.to(O.dtype.element_ty),
                 mask=rmask[:, None] & (odv[None, :] < DV))
        tl.store(LSE + z * n + rows, lse, mask=rmask)

    @triton.jit
    def _dq(Q, K, V, QP, KP, KK, DO, LSE, DELTA, DQ, n, nc, two, scale, self_score, C: tl.constexpr,
            BLOCK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
            CAUSAL: tl.constexpr, SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        c = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        rows = c * C + offs
        rmask = (offs < C) & (rows < n)
        q = tl.load(Q + z * n * D + rows[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        do = tl.load(DO + z * n * DV + rows[:, None] * DV + odv[None, :], mask=rmask[:, None] & (odv[None, :] < DV),
                     other=0.0)
        qp = tl.load(QP + z * n + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + z * n + rows, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + z * n + rows, mask=rmask, other=0.0)
        dq = tl.zeros([BLOCK, BD], tl.float32)
        for t in tl.static_range(2):
            kc = (c - t + nc) % nc
            cols = kc * C + offs
            cmask = (offs < C) & (cols < n)
            if t == 1:  # the chunk before (after); two = 0: the round is one chunk, read once
                cmask = cmask & (offs < C * two)
            k = tl.load(K + z * n * D + cols[:, None] * D + od[None, :], mask=cmask[:, None] & (od[None, :] < D),
                        other=0.0)
            v = tl.load(V + z * n * DV + cols[:, None] * DV + odv[None, :],
                        mask=cmask[:, None] & (odv[None, :] < DV), other=0.0)
            kp = tl.load(KP + z * n + cols, mask=cmask, other=-1)
            kk = kp
            if HAS_KEEP:
                kk = tl.load(KK + z * n + cols, mask=cmask, other=0)
            s, own = _scores(q, k, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL, SELF, HAS_KEEP)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if SELF == 1:
                ds = tl.where(own, 0.0, ds)  # a constant score: no gradient
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + z * n * D + rows[:, None] * D + od[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=rmask[:, None] & (od[None, :] < D))

    @triton.jit
    def _dkdv(Q, K, V, QP, KP, KK, DO, LSE, DELTA, DK, DV_, n, nc, two, scale, self_score, C: tl.constexpr,
              BLOCK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
              CAUSAL: tl.constexpr, SELF: tl.constexpr, HAS_KEEP: tl.constexpr):
        kc = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        cols = kc * C + offs
        cmask = (offs < C) & (cols < n)
        k = tl.load(K + z * n * D + cols[:, None] * D + od[None, :], mask=cmask[:, None] & (od[None, :] < D), other=0.0)
        v = tl.load(V + z * n * DV + cols[:, None] * DV + odv[None, :], mask=cmask[:, None] & (odv[None, :] < DV),
                    other=0.0)
        kp = tl.load(KP + z * n + cols, mask=cmask, other=-1)
        kk = kp
        if HAS_KEEP:
            kk = tl.load(KK + z * n + cols, mask=cmask, other=0)
        dk = tl.zeros([BLOCK, BD], tl.float32)
        dv = tl.zeros([BLOCK, BDV], tl.float32)
        for t in tl.static_range(2):
            c = (kc + t) % nc  # the query chunks that read this key chunk: its own and the next
            rows = c * C + offs
            rmask = (offs < C) & (rows < n)
            if t == 1:  # the chunk before (after); two = 0: the round is one chunk, read once
                rmask = rmask & (offs < C * two)
            q = tl.load(Q + z * n * D + rows[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D),
                        other=0.0)
            do = tl.load(DO + z * n * DV + rows[:, None] * DV + odv[None, :],
                         mask=rmask[:, None] & (odv[None, :] < DV), other=0.0)
            qp = tl.load(QP + z * n + rows, mask=rmask, other=-1)
            lse = tl.load(LSE + z * n + rows, mask=rmask, other=float("inf"))
            delta = tl.load(DELTA + z * n + rows, mask=rmask, other=0.0)
            s, own = _scores(q, k, qp, kp, kk, rmask, cmask, scale, self_score, CAUSAL, SELF, HAS_KEEP)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if SELF == 1:
                ds = tl.where(own, 0.0, ds)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        tl.store(DK + z * n * D + cols[:, None] * D + od[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=cmask[:, None] & (od[None, :] < D))
        tl.store(DV_ + z * n * DV + cols[:, None] * DV + odv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=cmask[:, None] & (odv[None, :] < DV))

    @triton.jit
    def _hash(X, ROT, OUT, n, H, NB2, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              ROUNDS: tl.constexpr):
        """Buckets of one block of rows for every round: ``argmax([x R; -x R])`` as a running max and min over
        column blocks of ``x R`` (the projection is never written)."""
        pid = tl.program_id(0)
        zh = tl.program_id(1).to(tl.int64)
        h = zh % H
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < n
        od = tl.arange(0, BD)
        x = tl.load(X + zh * n * D + rows[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D),
                    other=0.0)
        for r in range(ROUNDS):
            best = tl.full([BM], float("-inf"), tl.float32)
            worst = tl.full([BM], float("inf"), tl.float32)
            best_i = tl.zeros([BM], tl.int32)
            worst_i = tl.zeros([BM], tl.int32)
            for c0 in range(0, NB2, BN):
                cols = c0 + tl.arange(0, BN)
                cmask = cols < NB2
                w = tl.load(ROT + h * D * ROUNDS * NB2 + od[:, None] * ROUNDS * NB2 + r * NB2 + cols[None, :],
                            mask=(od[:, None] < D) & cmask[None, :], other=0.0)
                p = tl.dot(x, w)
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


def _meta(q, v, chunk, causal, self_mode, has_keep):
    n = q.shape[1]
    return dict(C=chunk, BLOCK=_pow2(chunk), D=q.shape[2], BD=_pow2(q.shape[2]), DV=v.shape[2], BDV=_pow2(v.shape[2]),
                CAUSAL=causal, SELF=self_mode, HAS_KEEP=has_keep, num_warps=4 if _pow2(chunk) <= 64 else 8), n


class _LSHChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, vs, qpos, kpos, kkeep, chunk, causal, self_mode, scale):
        qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()
        qpos, kpos = qpos.to(torch.int32).contiguous(), kpos.to(torch.int32).contiguous()
        keep = kkeep.to(torch.int8).contiguous() if kkeep is not None else kpos
        meta, n = _meta(qs, vs, chunk, causal, self_mode, kkeep is not None)
        z = qs.shape[0]
        nc = -(-n // chunk)
        o = torch.empty(z, n, vs.shape[2], device=qs.device, dtype=qs.dtype)
        lse = torch.empty(z, n, device=qs.device, dtype=torch.float32)
        _fwd[(nc, z)](qs, ks, vs, qpos, kpos, keep, o, lse, n, nc, int(nc > 1), float(scale), SELF_SCORE, **meta)
        ctx.save_for_backward(qs, ks, vs, qpos, kpos, keep, o, lse)
        ctx.args = (chunk, causal, self_mode, float(scale), kkeep is not None)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        qs, ks, vs, qpos, kpos, keep, o, lse = ctx.saved_tensors
        chunk, causal, self_mode, scale, has_keep = ctx.args
        meta, n = _meta(qs, vs, chunk, causal, self_mode, has_keep)
        z = qs.shape[0]
        nc = -(-n // chunk)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
        delta = delta.contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
        _dq[(nc, z)](qs, ks, vs, qpos, kpos, keep, do, lse_b, delta, dq, n, nc, int(nc > 1), scale, SELF_SCORE, **meta)
        _dkdv[(nc, z)](qs, ks, vs, qpos, kpos, keep, do, lse_b, delta, dk, dv, n, nc, int(nc > 1), scale, SELF_SCORE, **meta)
        return dq, dk, dv, None, None, None, None, None, None, None


def hash_buckets(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``argmax([x R; -x R])`` of ``x [b, h, n, d]`` and rotations ``rot [h, d, rounds, nb / 2]`` fused (one pass
    over ``x``, the projection never written): int64 ``[b, h, rounds, n]``, as
    :func:`attnzoo.ops.lsh.hashing.hash_vectors`."""
    why = available(x.device.type)
    if why is not None:
        raise RuntimeError(f"the LSH Triton kernel cannot run: {why}")
    b, h, n, d = x.shape
    rounds, nb2 = rot.shape[2], rot.shape[3]
    x = x.contiguous()
    rot = rot.to(x.dtype).contiguous()
    out = torch.empty(b, h, rounds, n, device=x.device, dtype=torch.int64)
    bm = 64
    _hash[(-(-n // bm), b * h)](x, rot, out, n, h, nb2, D=d, BD=_pow2(d), BM=bm, BN=min(128, _pow2(nb2)),
                                ROUNDS=rounds, num_warps=4)
    return out


def lsh_chunk_attention(qs, ks, vs, qpos, kpos, kkeep, *, chunk: int, causal: bool, self_mode: int, scale: float):
    """:func:`attnzoo.ops.lsh.chunked.chunk_attention` in the fused kernels (same arguments, same results)."""
    why = available(qs.device.type)
    if why is not None:
        raise RuntimeError(f"the LSH Triton kernel cannot run: {why}")
    return _LSHChunks.apply(qs, ks, vs, qpos, kpos, kkeep, chunk, causal, self_mode, scale)
