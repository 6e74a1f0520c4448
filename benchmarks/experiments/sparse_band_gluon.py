"""Experiment (round 5): the sliding-window kernels rewritten in Triton's Gluon dialect (Hopper), FA3 style.

Not library code: a record of what was measured for ``benchmarks/results/sparse-band-experiments-h200.md``
(round 5), like ``sparse_band_kernels.py`` for rounds 1-4. The production kernels are
``attnzoo/ops/sparse/triton_kernel.py``; these compute the same outputs (forward: out and the log2-domain LSE;
dQ, which also writes ``DELTA = rowsum(dO * O)``; dK/dV) for a band pattern with no global tokens and no padding,
bf16/fp16, on sm_90, and the script checks each one against the production kernels before timing it.

What is different from Triton's own code generation:

* every tile arrives by TMA into a ring of shared-memory stages (mbarriers), STAGES blocks ahead;
* asynchronous ``wgmma`` with explicit waits: the forward issues the next ``S = Q K^T`` together with the previous
  ``O += P V`` and runs the softmax while ``P V`` computes; dQ issues ``S``, ``dP`` with the previous
  ``dQ += dS K``; dK/dV issues ``S^T``, ``dP^T`` with the previous ``dV += P^T dO``, ``dK += dS^T Q``;
* ``A_REG``: the MMAs' A operands that never change in a program (Q; Q and dO; K and V) in registers;
* ``DIAG`` (forward only, diagnostic, wrong outputs): 1 = no TMA loads or waits in the loop, 2 = no softmax
  (no max, exponentials or sums), 4 = no MMAs in the loop; sums combine them (7: the loop does almost nothing).

Run on an H200: ``python benchmarks/experiments/sparse_band_gluon.py`` (prints one JSON line per measurement).
"""
from __future__ import annotations

import json
import os
import sys

import torch

try:
    import triton
    import triton.testing as tt
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_init,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - a GPU script
    gluon = None

if gluon is not None:

    @gluon.constexpr_function
    def _mma(num_warps, n):
        """Accumulator layout of a ``[rows, n]`` warpgroup MMA (one warp per 16 rows)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _band_range(r0, r_last, N, LO, HI, BLOCK: gl.constexpr):
        """Columns ``c`` with ``LO <= c - r <= HI`` for rows ``r0..r_last``, cut at multiples of BLOCK into masked
        ``[start, a)``, unmasked ``[a, b)``, masked ``[b, end)`` (rows -> keys with LO, HI; keys -> queries
        with -HI, -LO). As ``triton_kernel._band_stages``."""
        start = (gl.maximum(r0 + LO, 0) // BLOCK) * BLOCK
        end = gl.cdiv(gl.minimum(r_last + HI + 1, N), BLOCK) * BLOCK
        a = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(r_last + LO, 0), BLOCK) * BLOCK, start), end)
        b = gl.maximum(gl.minimum((gl.minimum(r0 + HI + 1, N) // BLOCK) * BLOCK, end), a)
        return start, a, b, end

    @gluon.jit
    def _load(desc, c0, c1, c2, bar, dst, ok):
        """TMA copy of one ``[1, 1, rows, D]`` block into ``dst``, counted on ``bar`` (nothing when not ``ok``)."""
        mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(desc, [c0, c1, c2, 0], bar, dst, pred=ok)

    @gluon.jit
    def _as2d(buf, ROWS: gl.constexpr, D: gl.constexpr):
        """A ``[1, 1, ROWS, D]`` TMA block in shared memory as the ``[ROWS, D]`` MMA operand it is."""
        return buf._reinterpret(buf.dtype, [ROWS, D], gl.NVMMASharedLayout.get_default_for([ROWS, D], buf.dtype))

    # -- forward: one program per block of queries and head --------------------------------------------
    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, O, LSE, sob, soh, son, H, N, LO, HI, qk_scale,
                    GROUPS: gl.constexpr, STAGES: gl.constexpr, A_REG: gl.constexpr, DIAG: gl.constexpr,
                    num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        D: gl.constexpr = q_desc.block_type.shape[3]
        dtype: gl.constexpr = q_desc.dtype
        s_l: gl.constexpr = _mma(num_warps, BLOCK_N)
        o_l: gl.constexpr = _mma(num_warps, D)
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_l)
        col_s: gl.constexpr = gl.SliceLayout(0, s_l)
        row_o: gl.constexpr = gl.SliceLayout(1, o_l)
        col_o: gl.constexpr = gl.SliceLayout(0, o_l)

        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUPS
        q0 = pid_m * BLOCK_M
        start, a, bb, end = _band_range(q0, gl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
        n_iter = (end - start) // BLOCK_N

        q_s = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, D], q_desc.layout)
        k_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, D], k_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, D], v_desc.layout)
        bar_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bar_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        bar_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_q, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bar_k.index(i), count=1)
            mbarrier.init(bar_v.index(i), count=1)
        fence_async_shared()
        _load(q_desc, b, h, q0, bar_q, q_s, True)
        for i in gl.static_range(STAGES):
            _load(k_desc, b, hk, start + i * BLOCK_N, bar_k.index(i), k_s.index(i), i < n_iter)
            _load(v_desc, b, hk, start + i * BLOCK_N, bar_v.index(i), v_s.index(i), i < n_iter)

        offs_m = q0 + gl.arange(0, BLOCK_M, layout=row_s)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_l)
        o = gl.zeros([BLOCK_M, D], gl.float32, o_l)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        mbarrier.wait(bar_q, 0)
        q2 = _as2d(q_s, BLOCK_M, D)
        if A_REG:  # Q as the register operand of every S = Q K^T: the MMAs then read only K from shared memory
            q2 = q2.load(gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))

        # block 0: S alone
        mbarrier.wait(bar_k.index(0), 0)
        s = warpgroup_mma(q2, _as2d(k_s.index(0), BLOCK_N, D).permute((1, 0)), zero_s, use_acc=False)
        if (start < a) | (start >= bb):
            offs_n = start + gl.arange(0, BLOCK_N, layout=col_s)
            dd = offs_n[None, :] - offs_m[:, None]
            s = gl.where((dd >= LO) & (dd <= HI) & (offs_n < N)[None, :], s, float("-inf"))
        m_i = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_i == float("-inf"), 0.0, m_i)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        l_i = gl.sum(p, 1)

        for j in range(1, n_iter):
            st = j % STAGES
            prev = (j - 1) % STAGES
            if DIAG % 2 == 0:
                mbarrier.wait(bar_k.index(st), (j // STAGES) & 1)
            if DIAG < 4:
                s_tok = warpgroup_mma(q2, _as2d(k_s.index(st), BLOCK_N, D).permute((1, 0)), s, use_acc=False,
                                      is_async=True)
            if DIAG % 2 == 0:
                mbarrier.wait(bar_v.index(prev), ((j - 1) // STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_l)
            if DIAG < 4:
                o = warpgroup_mma(p_op, _as2d(v_s.index(prev), BLOCK_N, D), o, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
            else:
                s = s * 1.0001
            if DIAG % 2 == 0:
                _load(k_desc, b, hk, start + (j - 1 + STAGES) * BLOCK_N, bar_k.index(prev), k_s.index(prev),
                      j - 1 + STAGES < n_iter)
            n0 = start + j * BLOCK_N
            if (n0 < a) | (n0 >= bb):
                offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_s)
                dd = offs_n[None, :] - offs_m[:, None]
                s = gl.where((dd >= LO) & (dd <= HI) & (offs_n < N)[None, :], s, float("-inf"))
            if (DIAG // 2) % 2 == 0:
                m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
                m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_use)
                p = gl.exp2(s * qk_scale - m_use[:, None])
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
            else:
                alpha = l_i * 0.0 + 1.0
                p = s * qk_scale
            if DIAG < 4:
                o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_op))
            else:
                o = o + 1.0
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            if DIAG % 2 == 0:
                _load(v_desc, b, hk, start + (j - 1 + STAGES) * BLOCK_N, bar_v.index(prev), v_s.index(prev),
                      j - 1 + STAGES < n_iter)

        last = (n_iter - 1) % STAGES
        if DIAG % 2 == 0:
            mbarrier.wait(bar_v.index(last), ((n_iter - 1) // STAGES) & 1)
        o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), _as2d(v_s.index(last), BLOCK_N, D), o)

        empty = l_i == 0.0
        lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))  # log2 domain; inf: empty
        o = o / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        om = q0 + gl.arange(0, BLOCK_M, layout=row_o)
        od = gl.arange(0, D, layout=col_o)
        gl.store(O + b * sob + h * soh + om[:, None] * son + od[None, :], o.to(dtype), mask=(om < N)[:, None])
        gl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)

    # -- dQ (and DELTA): one program per block of queries and head -------------------------------------
    @gluon.jit
    def _dq_kernel(q_desc, k_desc, v_desc, do_desc, O, LSE, DELTA, DQ, sob, soh, son, H, N, LO, HI, qk_scale,
                   sm_scale, GROUPS: gl.constexpr, STAGES: gl.constexpr, A_REG: gl.constexpr,
                   num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        D: gl.constexpr = q_desc.block_type.shape[3]
        dtype: gl.constexpr = q_desc.dtype
        gl.static_assert(STAGES >= 3, "the ring reloads a stage two blocks after its MMAs are issued")
        s_l: gl.constexpr = _mma(num_warps, BLOCK_N)
        dq_l: gl.constexpr = _mma(num_warps, D)
        ds_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_l, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_l)
        col_s: gl.constexpr = gl.SliceLayout(0, s_l)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUPS
        q0 = pid_m * BLOCK_M
        start, a, bb, end = _band_range(q0, gl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
        n_iter = (end - start) // BLOCK_N

        q_s = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, D], q_desc.layout)
        do_s = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, D], do_desc.layout)
        k_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, D], k_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, D], v_desc.layout)
        bar_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_q, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bar.index(i), count=1)
        fence_async_shared()
        mbarrier.expect(bar_q, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q0, 0], bar_q, q_s)
        tma.async_copy_global_to_shared(do_desc, [b, h, q0, 0], bar_q, do_s)
        for i in gl.static_range(STAGES - 1):  # block i+STAGES-1 is loaded once block i-1's dQ MMA is done
            ok = i < n_iter
            mbarrier.expect(bar.index(i), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [b, hk, start + i * BLOCK_N, 0], bar.index(i), k_s.index(i),
                                            pred=ok)
            tma.async_copy_global_to_shared(v_desc, [b, hk, start + i * BLOCK_N, 0], bar.index(i), v_s.index(i),
                                            pred=ok)

        # DELTA = rowsum(dO * O), for this kernel and the dK/dV one
        bm = q0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
        bd = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
        o = gl.load(O + b * sob + h * soh + bm[:, None] * son + bd[None, :], mask=(bm < N)[:, None], other=0.0)
        offs_m = q0 + gl.arange(0, BLOCK_M, layout=row_s)
        lse = gl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=float("inf"))
        mbarrier.wait(bar_q, 0)
        q2 = _as2d(q_s, BLOCK_M, D)
        do2 = _as2d(do_s, BLOCK_M, D)
        do = do2.load(blk)
        if A_REG:  # Q and dO as register operands: the MMAs read only K and V from shared memory
            q2 = q2.load(gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
            do2 = gl.convert_layout(do, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
        delta_b = gl.sum(o.to(gl.float32) * do.to(gl.float32), 1)
        gl.store(DELTA + bh * N + bm, delta_b, mask=bm < N)
        delta = gl.convert_layout(delta_b, row_s)
        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_l)
        dp = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_l)
        dq = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, dq_l))
        ds_op = gl.zeros([BLOCK_M, BLOCK_N], dtype, ds_l)

        for j in range(0, n_iter):
            st = j % STAGES
            mbarrier.wait(bar.index(st), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q2, _as2d(k_s.index(st), BLOCK_N, D).permute((1, 0)), s, use_acc=False,
                                  is_async=True)  # s, dp: consumed, their registers take the new ones
            dp_tok = warpgroup_mma(do2, _as2d(v_s.index(st), BLOCK_N, D).permute((1, 0)), dp, use_acc=False,
                                   is_async=True)
            if j > 0:
                prev = (j - 1) % STAGES
                dq = warpgroup_mma(ds_op, _as2d(k_s.index(prev), BLOCK_N, D), dq, is_async=True)
                s, dp = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, dp_tok))
            else:
                s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, dp_tok))
            # every MMA up to block j-2 is done: that stage takes block j-2+STAGES
            nxt = j - 2 + STAGES
            ld = (nxt % STAGES)
            ok = (j >= 1) & (nxt < n_iter)
            mbarrier.expect(bar.index(ld), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [b, hk, start + nxt * BLOCK_N, 0], bar.index(ld),
                                            k_s.index(ld), pred=ok)
            tma.async_copy_global_to_shared(v_desc, [b, hk, start + nxt * BLOCK_N, 0], bar.index(ld),
                                            v_s.index(ld), pred=ok)
            n0 = start + j * BLOCK_N
            if (n0 < a) | (n0 >= bb):
                offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_s)
                dd = offs_n[None, :] - offs_m[:, None]
                s = gl.where((dd >= LO) & (dd <= HI) & (offs_n < N)[None, :], s, float("-inf"))
            p = gl.exp2(s * qk_scale - lse[:, None])
            ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), ds_l)

        last = (n_iter - 1) % STAGES
        dq = warpgroup_mma(ds_op, _as2d(k_s.index(last), BLOCK_N, D), dq)
        dq_b = gl.convert_layout(dq * sm_scale, blk)
        gl.store(DQ + (bh * N + bm)[:, None] * D + bd[None, :], dq_b.to(dtype), mask=(bm < N)[:, None])

    # -- dK/dV: one program per block of keys and KV head ----------------------------------------------
    @gluon.jit
    def _dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, HK, H, N, LO, HI, qk_scale, sm_scale,
                     GROUPS: gl.constexpr, STAGES: gl.constexpr, A_REG: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        D: gl.constexpr = q_desc.block_type.shape[3]
        dtype: gl.constexpr = q_desc.dtype
        gl.static_assert(STAGES >= 3, "the ring reloads a stage two blocks after its MMAs are issued")
        st_l: gl.constexpr = _mma(num_warps, BLOCK_M)  # S^T [keys, queries]
        kv_l: gl.constexpr = _mma(num_warps, D)
        op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        row_t: gl.constexpr = gl.SliceLayout(1, st_l)
        col_t: gl.constexpr = gl.SliceLayout(0, st_l)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        pid_n = gl.program_id(0)
        bhk = gl.program_id(1)
        b = bhk // HK
        hk = bhk % HK
        k0 = pid_n * BLOCK_N
        start, a, bb, end = _band_range(k0, gl.minimum(k0 + BLOCK_N, N) - 1, N, -HI, -LO, BLOCK_M)
        nq = (end - start) // BLOCK_M
        n_iter = GROUPS * nq

        kq_s = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, D], k_desc.layout)
        q_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, D], q_desc.layout)
        do_s = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, D], do_desc.layout)
        bar_k = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_k, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bar.index(i), count=1)
        fence_async_shared()
        mbarrier.expect(bar_k, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, hk, k0, 0], bar_k, kq_s.index(0))
        tma.async_copy_global_to_shared(v_desc, [b, hk, k0, 0], bar_k, kq_s.index(1))
        for i in gl.static_range(STAGES - 1):  # block t+STAGES-2 is loaded once block t-2's MMAs are done
            ok = i < n_iter
            hq = hk * GROUPS + i // nq
            m0 = start + (i % nq) * BLOCK_M
            mbarrier.expect(bar.index(i), q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(q_desc, [b, hq, m0, 0], bar.index(i), q_s.index(i), pred=ok)
            tma.async_copy_global_to_shared(do_desc, [b, hq, m0, 0], bar.index(i), do_s.index(i), pred=ok)

        offs_n = k0 + gl.arange(0, BLOCK_N, layout=row_t)
        s_t = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_l)
        dp_t = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_l)
        dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, kv_l))
        dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, kv_l))
        pt_op = gl.zeros([BLOCK_N, BLOCK_M], dtype, op_l)
        dst_op = gl.zeros([BLOCK_N, BLOCK_M], dtype, op_l)
        mbarrier.wait(bar_k, 0)
        k2 = _as2d(kq_s.index(0), BLOCK_N, D)
        v2 = _as2d(kq_s.index(1), BLOCK_N, D)
        if A_REG >= 1:  # K (and V) as register operands: the MMAs read only Q and dO from shared memory
            k2 = k2.load(gl.DotOperandLayout(operand_index=0, parent=st_l, k_width=2))
        if A_REG >= 2:
            v2 = v2.load(gl.DotOperandLayout(operand_index=0, parent=st_l, k_width=2))

        for t in range(0, n_iter):
            hq = hk * GROUPS + t // nq
            m0 = start + (t % nq) * BLOCK_M
            offs_m = m0 + gl.arange(0, BLOCK_M, layout=col_t)
            row = (b * H + hq) * N
            lse = gl.load(LSE + row + offs_m, mask=offs_m < N, other=float("inf"))
            delta = gl.load(DELTA + row + offs_m, mask=offs_m < N, other=0.0)
            st = t % STAGES
            mbarrier.wait(bar.index(st), (t // STAGES) & 1)
            st_tok = warpgroup_mma(k2, _as2d(q_s.index(st), BLOCK_M, D).permute((1, 0)), s_t, use_acc=False,
                                   is_async=True)  # s_t, dp_t: consumed, their registers take the new ones
            dpt_tok = warpgroup_mma(v2, _as2d(do_s.index(st), BLOCK_M, D).permute((1, 0)), dp_t, use_acc=False,
                                    is_async=True)
            if t > 0:
                prev = (t - 1) % STAGES
                dv = warpgroup_mma(pt_op, _as2d(do_s.index(prev), BLOCK_M, D), dv, is_async=True)
                dk = warpgroup_mma(dst_op, _as2d(q_s.index(prev), BLOCK_M, D), dk, is_async=True)
                s_t, dp_t = warpgroup_mma_wait(num_outstanding=2, deps=(st_tok, dpt_tok))
            else:
                s_t, dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(st_tok, dpt_tok))
            nxt = t - 2 + STAGES
            ld = nxt % STAGES
            ok = (t >= 1) & (nxt < n_iter)
            hn = hk * GROUPS + nxt // nq
            mn = start + (nxt % nq) * BLOCK_M
            mbarrier.expect(bar.index(ld), q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(q_desc, [b, hn, mn, 0], bar.index(ld), q_s.index(ld), pred=ok)
            tma.async_copy_global_to_shared(do_desc, [b, hn, mn, 0], bar.index(ld), do_s.index(ld), pred=ok)
            if (m0 < a) | (m0 >= bb):
                dd = offs_n[:, None] - offs_m[None, :]
                s_t = gl.where((dd >= LO) & (dd <= HI), s_t, float("-inf"))
            p_t = gl.exp2(s_t * qk_scale - lse[None, :])
            pt_op = gl.convert_layout(p_t.to(dtype), op_l)
            dst_op = gl.convert_layout((p_t * (dp_t - delta[None, :])).to(dtype), op_l)

        last = (n_iter - 1) % STAGES
        dv = warpgroup_mma(pt_op, _as2d(do_s.index(last), BLOCK_M, D), dv, is_async=True)
        dk = warpgroup_mma(dst_op, _as2d(q_s.index(last), BLOCK_M, D), dk, is_async=True)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        bn = k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
        bd = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
        ptr = (bhk * N + bn)[:, None] * D + bd[None, :]
        gl.store(DK + ptr, gl.convert_layout(dk * sm_scale, blk).to(dtype), mask=(bn < N)[:, None])
        gl.store(DV + ptr, gl.convert_layout(dv, blk).to(dtype), mask=(bn < N)[:, None])




def _desc(t: torch.Tensor, rows: int):
    """TMA descriptor of a ``[B, H, N, D]`` tensor (contiguous last dim) in ``[1, 1, rows, D]`` blocks."""
    block = [1, 1, rows, t.shape[-1]]
    dt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, dt))


def run_fwd(q, k, v, lo, hi, scale, cfg, diag=0):
    """cfg = (BLOCK_M, BLOCK_N, STAGES, warps, A_REG): (out, lse)."""
    b, h, n, d = q.shape
    bm, bn, st, w, ar = cfg
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device)
    _fwd_kernel[(triton.cdiv(n, bm), b * h)](
        _desc(q, bm), _desc(k, bn), _desc(v, bn), o, lse, o.stride(0), o.stride(1), o.stride(2), h, n, lo, hi,
        scale * 1.4426950408889634, GROUPS=h // k.shape[1], STAGES=st, A_REG=ar, DIAG=diag, num_warps=w)
    return o, lse


def run_dq(q, k, v, o, lse, do, lo, hi, scale, cfg):
    b, h, n, d = q.shape
    bm, bn, st, w, ar = cfg
    delta = torch.empty(b, h, n, device=q.device)
    dq = torch.empty_like(q)
    _dq_kernel[(triton.cdiv(n, bm), b * h)](
        _desc(q, bm), _desc(k, bn), _desc(v, bn), _desc(do, bm), o, lse, delta, dq, o.stride(0), o.stride(1),
        o.stride(2), h, n, lo, hi, scale * 1.4426950408889634, scale, GROUPS=h // k.shape[1], STAGES=st, A_REG=ar,
        num_warps=w)
    return dq, delta


def run_dkdv(q, k, v, do, lse, delta, lo, hi, scale, cfg):
    b, h, n, d = q.shape
    hk = k.shape[1]
    bm, bn, st, w, ar = cfg
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _dkdv_kernel[(triton.cdiv(n, bn), b * hk)](
        _desc(q, bm), _desc(k, bn), _desc(v, bn), _desc(do, bm), lse, delta, dk, dv, hk, h, n, lo, hi,
        scale * 1.4426950408889634, scale, GROUPS=h // hk, STAGES=st, A_REG=ar, num_warps=w)
    return dk, dv


CONFIGS = {
    "fwd": [(64, 64, 3, 4, 0), (64, 64, 3, 4, 1), (64, 64, 2, 4, 1), (64, 64, 4, 4, 1), (64, 128, 2, 4, 1),
            (128, 64, 3, 8, 1), (128, 128, 2, 8, 1)],
    "dq": [(64, 64, 3, 4, 0), (64, 64, 3, 4, 1), (64, 64, 4, 4, 0), (64, 64, 4, 4, 1), (128, 64, 3, 8, 0)],
    "dkdv": [(64, 64, 3, 4, 0), (64, 64, 3, 4, 1), (64, 64, 3, 4, 2), (64, 64, 4, 4, 2), (64, 128, 3, 8, 1)],
}


def main() -> int:
    sys.path.insert(0, os.getcwd())
    from attnzoo.ops import sparse_attention
    from attnzoo.ops.sparse import SlidingWindow

    def med_us(fn):
        fn()
        torch.cuda.synchronize()
        return round(tt.do_bench_cudagraph(fn, rep=150, return_mode="median") * 1000, 1)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    w = 256
    for n, hq, hk, causal in ((16384, 12, 12, False), (1500, 8, 4, True)):
        timed = n == 16384
        lo, hi = (-w, 0) if causal else (-w, w)
        pat = SlidingWindow(window=w, causal=causal)
        q = torch.randn(1, hq, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, hk, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        do = torch.randn_like(q)
        ref_o = sparse_attention(q, k, v, pat, backend="triton")  # the production Triton kernels
        ref_g = torch.autograd.grad(ref_o, (q, k, v), do)
        ref_o = ref_o.detach()
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        if timed:
            print(json.dumps({"n": n, "kernel": "production triton, fwd + bwd given dO",
                              "us": med_us(lambda: torch.autograd.grad(
                                  sparse_attention(q, k, v, pat, backend="triton"), (q, k, v), do))}), flush=True)
        o, lse = run_fwd(qd, kd, vd, lo, hi, 0.125, CONFIGS["fwd"][1])
        _, delta = run_dq(qd, kd, vd, o, lse, do, lo, hi, 0.125, CONFIGS["dq"][0])
        for kind, cfgs in CONFIGS.items():
            for cfg in cfgs:
                if kind == "fwd":
                    fn = lambda: run_fwd(qd, kd, vd, lo, hi, 0.125, cfg)  # noqa: E731
                    err = rel(fn()[0], ref_o)
                elif kind == "dq":
                    fn = lambda: run_dq(qd, kd, vd, o, lse, do, lo, hi, 0.125, cfg)  # noqa: E731
                    err = rel(fn()[0], ref_g[0])
                else:
                    fn = lambda: run_dkdv(qd, kd, vd, do, lse, delta, lo, hi, 0.125, cfg)  # noqa: E731
                    dk, dv = fn()
                    err = max(rel(dk, ref_g[1]), rel(dv, ref_g[2]))
                print(json.dumps({"n": n, "kernel": kind, "cfg": cfg, "err_vs_production": err,
                                  "us": med_us(fn) if timed else None}), flush=True)
        if timed:
            for diag in range(8):
                print(json.dumps({"n": n, "kernel": "fwd DIAG", "diag": diag, "cfg": CONFIGS["fwd"][1],
                                  "us": med_us(lambda: run_fwd(qd, kd, vd, lo, hi, 0.125, CONFIGS["fwd"][1], diag))}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
