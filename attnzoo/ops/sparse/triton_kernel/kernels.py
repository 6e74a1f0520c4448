"""attnzoo's block-sparse FlashAttention kernels in Triton: the ``triton.jit`` code.

Three entry points, as FlashAttention-2: :func:`_fwd_kernel` (one program per block of queries and head: online
softmax, output and base-2 log-sum-exp; ``STAGE`` picks the softmax reference, :class:`~.codes.Stage`),
:func:`_dq_kernel` (which also writes ``rowsum(dO * O)``) and :func:`_dkdv_kernel` (one program per block of keys and
KV head, looping over its query heads: grouped KV heads without atomics). ``MODE`` (:class:`~.codes.Mode`) says how
the keys are walked and ``MASK``/``FMASK``/``PMASK`` (:class:`~.codes.Mask`) what a block evaluates; the host side
is :mod:`.autograd` (arguments, grids) and :mod:`.tuning` (tile configurations).

Importable without Triton: :func:`available` says why the kernels cannot run.
"""
from __future__ import annotations

import os

from .codes import ITEM_FIELDS, REDO_CHUNK, Mask, Mode, Stage

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are optional; attnzoo works without Triton
    triton = None

__all__ = ["available", "interpreted"]


def interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``, Triton's own setting: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device_type: str) -> str | None:
    """None if the kernel can run on ``device_type`` here, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device_type != "cuda" and not interpreted():
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's interpreter), inputs are on {device_type}"
    return None


def _interpreter_index_shim() -> None:
    """Triton's interpreter turns a scalar into a 1-element array and ``int()``s it for loop bounds, which
    NumPy >= 2.4 refuses for 1-d arrays; read the element instead (interpreter only, i.e. the CPU tests)."""
    from triton.runtime import interpreter as ti

    orig = ti._patch_lang_tensor
    if getattr(orig, "_attnzoo", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._attnzoo = True
    ti._patch_lang_tensor = patched


if triton is not None and interpreted():
    _interpreter_index_shim()



if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)
    _REDO_CHUNK = tl.constexpr(REDO_CHUNK)
    _ITEM_FIELDS = tl.constexpr(ITEM_FIELDS)
    # the codes of .codes as constexpr globals (jit code reads only constexpr globals)
    BAND = tl.constexpr(Mode.BAND)
    M_NONE = tl.constexpr(Mask.NONE)
    M_BAND = tl.constexpr(Mask.BAND)
    M_CAUSAL = tl.constexpr(Mask.CAUSAL)
    M_BITS = tl.constexpr(Mask.BITS)
    M_OUTSIDE_BAND = tl.constexpr(Mask.OUTSIDE_BAND)
    S_FIXED = tl.constexpr(Stage.FIXED)
    S_REDO = tl.constexpr(Stage.REDO)

    @triton.jit
    def _bits_keep(bits_ptr, mid, rows, cols, TILE: tl.constexpr):
        """Bool [rows, cols] of partial tile ``mid`` (rows/cols: offsets inside the tile)."""
        words = tl.load(bits_ptr + mid * (TILE * (TILE // 32)) + rows[:, None] * (TILE // 32) + (cols // 32)[None, :])
        return ((words >> (cols % 32)[None, :]) & 1) != 0

    @triton.jit
    def _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr):
        """Bool [M, N] of kept pairs under ``MASK`` (a :class:`~.codes.Mask` code; ``M_NONE`` and ``Mask.BOUNDS``:
        bounds only, and callers skip this for ``M_NONE``); for ``M_OUTSIDE_BAND`` ``offs_n`` holds the global
        columns' positions. Key padding on top when ``HAS_KPM``."""
        keep = (offs_n < N)[None, :] & (offs_m >= 0)[:, None]
        if MASK == M_BAND:
            dd = offs_n[None, :] - offs_m[:, None]
            keep = keep & (dd >= LO) & (dd <= HI)
        if MASK == M_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if MASK == M_BITS:
            keep = keep & _bits_keep(bits_ptr, mid, rows_t, cols_t, TILE)
        if MASK == M_OUTSIDE_BAND:
            dd = offs_n[None, :] - offs_m[:, None]
            if CAUSAL:
                keep = keep & (dd < LO)
            else:
                keep = keep & ((dd < LO) | (dd > HI))
        if HAS_KPM:
            keep = keep & (tl.load(kpm_base + offs_n, mask=offs_n < N, other=0) != 0)[None, :]
        return keep

    @triton.jit
    def _keep_t(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr):
        """:func:`_keep` transposed: bool [N, M] (keys along the rows), for the dK/dV kernel."""
        keep = (offs_n < N)[:, None] & (offs_m >= 0)[None, :]
        if MASK == M_BAND:
            dd = offs_n[:, None] - offs_m[None, :]
            keep = keep & (dd >= LO) & (dd <= HI)
        if MASK == M_CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :])
        if MASK == M_BITS:
            words = tl.load(bits_ptr + mid * (TILE * (TILE // 32)) + rows_t[None, :] * (TILE // 32)
                            + (cols_t // 32)[:, None])
            keep = keep & (((words >> (cols_t % 32)[:, None]) & 1) != 0)
        if HAS_KPM:
            keep = keep & (tl.load(kpm_base + offs_n, mask=offs_n < N, other=0) != 0)[:, None]
        return keep

    @triton.jit
    def _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, bits_ptr, mid, offs_m, offs_n, rows_t, cols_t,
                   N, LO, HI, skn, svn, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PREC: tl.constexpr, FIXED_M: tl.constexpr = False):
        """One ``[BLOCK_M, BLOCK_N]`` tile of the online softmax. ``FIXED_M``: ``m_i`` is a fixed per-row reference
        (:func:`_fwd_tile`'s fast band path): no row max, no rescale of ``acc`` and ``l_i``, and the exponentials
        do not wait for a row reduction."""
        offs_d = tl.arange(0, HEAD_DIM)
        if MASK == M_NONE and not HAS_KPM:
            k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])
        else:
            inb = offs_n < N
            k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=inb[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=inb[:, None], other=0.0)
        return _fwd_step(acc, m_i, l_i, q, k, v, kpm_base, bits_ptr, mid, offs_m, offs_n, rows_t, cols_t, N, LO, HI,
                         qk_scale, MASK, CAUSAL, HAS_KPM, TILE, PREC, FIXED_M)

    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, k, v, kpm_base, bits_ptr, mid, offs_m, offs_n, rows_t, cols_t, N, LO, HI,
                  qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr,
                  PREC: tl.constexpr, FIXED_M: tl.constexpr):
        """The online-softmax step of :func:`_fwd_block` on loaded ``k`` ``[HEAD_DIM, BLOCK_N]`` and ``v``
        ``[BLOCK_N, HEAD_DIM]``."""
        s = tl.dot(q, k, input_precision=PREC)  # unscaled: the scale goes into the exponent's multiply-add
        if FIXED_M:
            if MASK != M_NONE or HAS_KPM:
                keep = _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t, MASK, CAUSAL,
                             HAS_KPM, TILE)
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = acc + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            return acc, m_i, l_i
        if MASK == M_NONE and not HAS_KPM:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        else:
            keep = _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t, MASK, CAUSAL, HAS_KPM,
                         TILE)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, start, end, N, LO, HI, skn, svn, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PREC: tl.constexpr, FIXED_M: tl.constexpr):
        """Keys ``start..end`` of a band, one BLOCK_N block at a time."""
        for start_n in tl.range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, kpm_base, 0, offs_m, offs_n,
                                       offs_m, offs_n, N, LO, HI, skn, svn, qk_scale, MASK, CAUSAL, HAS_KPM, 32,
                                       HEAD_DIM, PREC, FIXED_M)
        return acc, m_i, l_i

    @triton.jit
    def _band_stages(q0, q_last, N, LO, HI, BLOCK: tl.constexpr):
        """Key range of queries ``q0..q_last`` under the band, cut at multiples of BLOCK into
        masked ``[start, a)``, unmasked ``[a, b)``, masked ``[b, end)`` (also for keys -> queries with -HI, -LO)."""
        start = (tl.maximum(q0 + LO, 0) // BLOCK) * BLOCK
        end = tl.cdiv(tl.minimum(q_last + HI + 1, N), BLOCK) * BLOCK
        a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(q_last + LO, 0), BLOCK) * BLOCK, start), end)
        b = tl.maximum(tl.minimum((tl.minimum(q0 + HI + 1, N) // BLOCK) * BLOCK, end), a)
        return start, a, b, end

    @triton.jit
    def _query_program(ORDER, H, GROUPS: tl.constexpr, MODE: tl.constexpr):
        """(query block, batch x head, batch, head, KV head) of this program in the forward and dQ kernels.
        Band: grid (blocks, heads); list: grid (heads, tiles), heads fastest, query tiles heaviest first."""
        if MODE == BAND:
            pid_m = tl.program_id(0)
            bh = tl.program_id(1)
        else:
            bh = tl.program_id(0)
            pid_m = tl.load(ORDER + tl.program_id(1))
        h = bh % H
        return pid_m, bh, bh // H, h, h // GROUPS

    @triton.jit
    def _fwd_tile(Q, K, V, OUT, LSE, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, FLAGS, pid_m, bh,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                  H, N, T_TILES, G, LO, HI, sm_scale,
                  GROUPS: tl.constexpr, MODE: tl.constexpr, FMASK: tl.constexpr, PMASK: tl.constexpr,
                  CAUSAL: tl.constexpr, PREC: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_GLOBAL: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  FIXED_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward of query block ``pid_m`` of batch x head ``bh``: output and log-sum-exp. ``FIXED_M`` (band
        mode, every row keeps its own key): each row's softmax reference is its self-score instead of a running
        max; the block's flag in ``FLAGS`` says whether that overflowed (see :func:`_fwd_kernel`)."""
        h = bh % H
        b = bh // H
        hk = h // GROUPS
        q0 = pid_m * BLOCK_M
        offs_m = q0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=(offs_m < N)[:, None],
                    other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        kpm_base = KPM + b * N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * _LOG2E  # exp2 below
        if MODE == BAND:
            if FIXED_M:  # the self-scores q_i . k_i, in the exponent's units
                kd = tl.load(k_base + offs_m[:, None] * skn + offs_d[None, :], mask=(offs_m < N)[:, None], other=0.0)
                m_i = tl.sum(q.to(tl.float32) * kd.to(tl.float32), 1) * qk_scale
            start, a, bb, end = _band_stages(q0, tl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, start, a, N, LO, HI,
                                       skn, svn, qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, a, bb, N, LO, HI,
                                       skn, svn, qk_scale, M_NONE, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, bb, end, N, LO, HI,
                                       skn, svn, qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            if HAS_GLOBAL:
                for g0 in range(0, G, BLOCK_N):
                    offs_g = g0 + tl.arange(0, BLOCK_N)
                    pos = tl.load(GPOS + offs_g, mask=offs_g < G, other=N)  # N: out of bounds, masked
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, 0, offs_m, pos,
                                               offs_m, pos, N, LO, HI, skn, svn, qk_scale, M_OUTSIDE_BAND, CAUSAL, HAS_KPM, TILE,
                                               HEAD_DIM, PREC, FIXED_M)
        else:
            qt = q0 // TILE
            rows_t = offs_m - qt * TILE
            for slot in range(0, tl.load(FC + qt)):
                kt = tl.load(FI + qt * T_TILES + slot)
                for sub in tl.static_range(TILE // BLOCK_N):
                    cols_t = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, 0, offs_m,
                                               kt * TILE + cols_t, rows_t, cols_t, N, LO, HI, skn, svn, qk_scale,
                                               FMASK, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
            for slot in range(0, tl.load(PC + qt)):
                kt = tl.load(PI + qt * T_TILES + slot)
                mid = tl.load(IDS + qt * T_TILES + slot)
                for sub in tl.static_range(TILE // BLOCK_N):
                    cols_t = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, mid, offs_m,
                                               kt * TILE + cols_t, rows_t, cols_t, N, LO, HI, skn, svn, qk_scale,
                                               PMASK, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 domain; inf: empty
        tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(offs_m < N)[:, None])
        tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)
        if FIXED_M:  # inf or nan anywhere in the block's rows: an exponent overflowed, redo them
            bad = ((out - out) != 0.0) | ((l_i - l_i) != 0.0)[:, None]
            tl.store(FLAGS + bh * tl.cdiv(N, BLOCK_M) + pid_m,
                     tl.max(tl.where(bad & (offs_m < N)[:, None], 1, 0)).to(tl.int8))

    @triton.jit
    def _fwd_kernel(Q, K, V, OUT, LSE, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, ORDER, FLAGS,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    H, N, T_TILES, G, LO, HI, sm_scale, BH,
                    GROUPS: tl.constexpr, MODE: tl.constexpr, FMASK: tl.constexpr, PMASK: tl.constexpr,
                    CAUSAL: tl.constexpr, PREC: tl.constexpr,
                    HAS_KPM: tl.constexpr, HAS_GLOBAL: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward. ``STAGE`` 0: the online softmax with a running max, one program per query block and head.
        1 (band mode where every row keeps its own key, see :func:`_fixed_reference`): each row's self-score as a
        fixed softmax reference, which saves the running max and the rescales, ~7% of the forward; a block whose
        exponent overflowed (a kept score about 128 log2-units above the row's self-score) sets its flag. 2, after
        stage 1: each program reads ``REDO_CHUNK`` flags and redoes the flagged blocks with the running max (one
        small launch; it returns at once when nothing overflowed)."""
        if STAGE == S_REDO:
            total = BH * tl.cdiv(N, BLOCK_M)
            c0 = tl.program_id(0) * _REDO_CHUNK
            offs = c0 + tl.arange(0, _REDO_CHUNK)
            if tl.max(tl.load(FLAGS + offs, mask=offs < total, other=0).to(tl.int32)) > 0:
                for i in range(c0, tl.minimum(c0 + _REDO_CHUNK, total)):
                    if tl.load(FLAGS + i) != 0:
                        _fwd_tile(Q, K, V, OUT, LSE, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, FLAGS,
                                  i % tl.cdiv(N, BLOCK_M), i // tl.cdiv(N, BLOCK_M),
                                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                                  H, N, T_TILES, G, LO, HI, sm_scale, GROUPS, MODE, FMASK, PMASK, CAUSAL, PREC,
                                  HAS_KPM, HAS_GLOBAL, TILE, HEAD_DIM, False, BLOCK_M, BLOCK_N)  # running max
        else:
            pid_m, bh, _, _, _ = _query_program(ORDER, H, GROUPS, MODE)
            _fwd_tile(Q, K, V, OUT, LSE, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, FLAGS, pid_m, bh,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      H, N, T_TILES, G, LO, HI, sm_scale, GROUPS, MODE, FMASK, PMASK, CAUSAL, PREC,
                      HAS_KPM, HAS_GLOBAL, TILE, HEAD_DIM, STAGE == S_FIXED, BLOCK_M, BLOCK_N)

    # -- dK/dV: one program per block of keys and KV head -------------------------------------
    @triton.jit
    def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, bits_ptr, mid, offs_m, offs_n,
                    rows_t, cols_t, N, LO, HI, sqn, sdon, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < N
        qT = tl.load(q_base + offs_m[None, :] * sqn + offs_d[:, None], mask=rows[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdon + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        sT = tl.dot(k, qT, input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        if MASK != M_NONE or HAS_KPM:
            keep = _keep_t(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t, MASK, CAUSAL, HAS_KPM,
                           TILE)
            pT = tl.where(keep, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
        return dk, dv

    @triton.jit
    def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, start, end, N, LO, HI,
                    sqn, sdon, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
        for start_m in tl.range(start, end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, kpm_base, 0, offs_m,
                                 offs_n, offs_m, offs_n, N, LO, HI, sqn, sdon, qk_scale, MASK, CAUSAL, HAS_KPM, 32,
                                 HEAD_DIM, PREC)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, BITS, FCT, FIT, PCT, PIT, IDST, ITEMS, SCR, CNT,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                     HK, H, N, T_TILES, LO, HI, sm_scale,
                     GROUPS: tl.constexpr, MODE: tl.constexpr, FMASK: tl.constexpr, PMASK: tl.constexpr,
                    CAUSAL: tl.constexpr,
                     HAS_KPM: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        if MODE == BAND:
            pid_n = tl.program_id(0)
            bhk = tl.program_id(1)
            lo = 0
            hi = 0
            sid = -1
            parts = 1
        else:  # one work item: KV tile, its query-tile slots [lo, hi), split id (-1: whole tile), parts
            bhk = tl.program_id(0)
            item = ITEMS + tl.program_id(1) * _ITEM_FIELDS
            pid_n = tl.load(item)
            lo = tl.load(item + 1)
            hi = tl.load(item + 2)
            sid = tl.load(item + 3)
            parts = tl.load(item + 4)
        b = bhk // HK
        hk = bhk % HK
        k0 = pid_n * BLOCK_N
        offs_n = k0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kmask = (offs_n < N)[:, None]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * _LOG2E
        kpm_base = KPM + b * N
        for g in range(0, GROUPS):
            h = hk * GROUPS + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
            lse_base = LSE + (b * H + h) * N
            delta_base = DELTA + (b * H + h) * N
            if MODE == BAND:  # queries i with LO <= j - i <= HI: i in [j - HI, j - LO]
                start, a, bb, end = _band_stages(k0, tl.minimum(k0 + BLOCK_N, N) - 1, N, -HI, -LO, BLOCK_M)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, start, a,
                                     N, LO, HI, sqn, sdon, qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM, PREC)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, a, bb,
                                     N, LO, HI, sqn, sdon, qk_scale, M_NONE, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM,
                                     PREC)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, bb, end,
                                     N, LO, HI, sqn, sdon, qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM, PREC)
            else:
                kt = k0 // TILE
                cols_t = offs_n - kt * TILE
                fcount = tl.load(FCT + kt)  # slots [0, fcount): full tiles, then the partial ones
                for slot in range(lo, tl.minimum(hi, fcount)):
                    qt = tl.load(FIT + kt * T_TILES + slot)
                    for sub in tl.static_range(TILE // BLOCK_M):
                        rows_t = sub * BLOCK_M + tl.arange(0, BLOCK_M)
                        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, BITS, 0,
                                             qt * TILE + rows_t, offs_n, rows_t, cols_t, N, LO, HI, sqn, sdon,
                                             qk_scale, M_NONE, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
                for slot in range(tl.maximum(lo - fcount, 0), hi - fcount):
                    qt = tl.load(PIT + kt * T_TILES + slot)
                    mid = tl.load(IDST + kt * T_TILES + slot)
                    for sub in tl.static_range(TILE // BLOCK_M):
                        rows_t = sub * BLOCK_M + tl.arange(0, BLOCK_M)
                        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, BITS,
                                             mid, qt * TILE + rows_t, offs_n, rows_t, cols_t, N, LO, HI, sqn, sdon,
                                             qk_scale, PMASK, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
        out = (bhk * N + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        dk = dk * sm_scale
        if MODE == BAND:
            tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)
        elif sid >= 0:  # one part of a split tile: add it into the float32 scratch; the last part writes the tile
            nbhk = tl.num_programs(0)
            scr = SCR + (sid * nbhk + bhk) * (2 * BLOCK_N * HEAD_DIM) + (offs_n - k0)[:, None] * HEAD_DIM \
                + offs_d[None, :]
            tl.atomic_add(scr, dk)
            tl.atomic_add(scr + BLOCK_N * HEAD_DIM, dv)
            if tl.atomic_add(CNT + sid * nbhk + bhk, 1) == parts - 1:  # acq_rel: the other parts are in
                dk_all = tl.load(scr, cache_modifier=".cg")
                dv_all = tl.load(scr + BLOCK_N * HEAD_DIM, cache_modifier=".cg")
                tl.store(DK + out, dk_all.to(DK.dtype.element_ty), mask=kmask)
                tl.store(DV + out, dv_all.to(DV.dtype.element_ty), mask=kmask)
        else:
            tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)

    # -- dQ: one program per block of queries and head -----------------------------------------
    @triton.jit
    def _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, bits_ptr, mid, offs_m, offs_n, rows_t, cols_t,
                  N, LO, HI, skn, svn, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  TILE: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        if MASK == M_NONE and not HAS_KPM:
            kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None])
            vT = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None])
        else:
            inb = (offs_n < N)[None, :]
            kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=inb, other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None], mask=inb, other=0.0)
        s = tl.dot(q, kT, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK != M_NONE or HAS_KPM:
            keep = _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t, MASK, CAUSAL, HAS_KPM,
                         TILE)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
        return dq

    @triton.jit
    def _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, start, end, N, LO, HI, skn, svn,
                  qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
        for start_n in tl.range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, kpm_base, 0, offs_m, offs_n, offs_m,
                           offs_n, N, LO, HI, skn, svn, qk_scale, MASK, CAUSAL, HAS_KPM, 32, HEAD_DIM, PREC)
        return dq

    @triton.jit
    def _dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, ORDER,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
                   H, N, T_TILES, G, LO, HI, sm_scale,
                   GROUPS: tl.constexpr, MODE: tl.constexpr, FMASK: tl.constexpr, PMASK: tl.constexpr,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_GLOBAL: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh, b, h, hk = _query_program(ORDER, H, GROUPS, MODE)
        q0 = pid_m * BLOCK_M
        offs_m = q0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :], mask=rows[:, None],
                     other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=rows, other=float("inf"))
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=rows[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O), also for the dK/dV kernel
        tl.store(DELTA + bh * N + offs_m, delta, mask=rows)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        kpm_base = KPM + b * N
        qk_scale = sm_scale * _LOG2E
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if MODE == BAND:
            start, a, bb, end = _band_stages(q0, tl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, start, a, N, LO, HI, skn, svn,
                           qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, a, bb, N, LO, HI, skn, svn,
                           qk_scale, M_NONE, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, bb, end, N, LO, HI, skn, svn,
                           qk_scale, M_BAND, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            if HAS_GLOBAL:
                for g0 in range(0, G, BLOCK_N):
                    offs_g = g0 + tl.arange(0, BLOCK_N)
                    pos = tl.load(GPOS + offs_g, mask=offs_g < G, other=N)
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, 0, offs_m, pos, offs_m,
                                   pos, N, LO, HI, skn, svn, qk_scale, M_OUTSIDE_BAND, CAUSAL, HAS_KPM, TILE, HEAD_DIM,
                                   PREC)
        else:
            qt = q0 // TILE
            rows_t = offs_m - qt * TILE
            for slot in range(0, tl.load(FC + qt)):
                kt = tl.load(FI + qt * T_TILES + slot)
                for sub in tl.static_range(TILE // BLOCK_N):
                    cols_t = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, 0, offs_m,
                                   kt * TILE + cols_t, rows_t, cols_t, N, LO, HI, skn, svn, qk_scale, FMASK,
                                   CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
            for slot in range(0, tl.load(PC + qt)):
                kt = tl.load(PI + qt * T_TILES + slot)
                mid = tl.load(IDS + qt * T_TILES + slot)
                for sub in tl.static_range(TILE // BLOCK_N):
                    cols_t = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, mid, offs_m,
                                   kt * TILE + cols_t, rows_t, cols_t, N, LO, HI, skn, svn, qk_scale, PMASK,
                                   CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
        tl.store(DQ + (bh * N + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=rows[:, None])
