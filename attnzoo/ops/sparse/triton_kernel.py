"""A block-sparse FlashAttention kernel in Triton over attnzoo's block layouts (forward and backward).

It visits exactly the layout's tiles (:mod:`attnzoo.ops.sparse.layout`): full tiles with no
mask at all, partial tiles with a bit-packed copy of the pattern's mask for that tile (one bit
per (query, key) pair, 2 KiB per 128x128 tile), so any pattern runs on the same kernel. Keys
are also bounded by the sequence length and the key-padding mask. Grouped KV heads are read
in place; the dK/dV kernel loops over a KV head's query heads (no atomics).

Three kernels: the forward (one program per block of queries and head: online softmax over the
visited tiles, stores the output and the log-sum-exp), dK/dV (one program per block of keys and
KV head, over the query tiles that visit its tile: the transposed layout) and dQ (one program per
block of queries, as the forward). Tile sizes and warps are autotuned per shape on the GPU.

Importable without Triton: :func:`available` says why it cannot run. Off CUDA it runs under
Triton's interpreter (``TRITON_INTERPRET=1``), which the CPU tests use.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional; attnzoo works without Triton
    triton = None

__all__ = ["available", "interpreted", "layout_tensors", "block_sparse_attention"]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device_type: str) -> str | None:
    """None if the kernel can run on ``device_type`` here, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device_type != "cuda" and not interpreted():
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's interpreter), inputs are on {device_type}"
    return None


# ---------------------------------------------------------------------------- layout tensors
def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[P, T, T]`` -> int32 ``[P, T, T // 32]``: bit ``c % 32`` of word ``c // 32`` is column ``c``."""
    p, t, _ = mask.shape
    words = mask.view(p, t, t // 32, 32).to(torch.int64)
    v = (words << torch.arange(32, device=mask.device, dtype=torch.int64)).sum(-1)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def _transpose(count: torch.Tensor, index: torch.Tensor, ids: torch.Tensor | None):
    """Row-major (query tile -> kv tiles) lists -> (kv tile -> query tiles) lists (+ the same ids)."""
    t = count.shape[0]
    cols = torch.arange(t, device=count.device)
    sel = cols[None, :] < count[:, None]
    qt = cols[:, None].expand(t, t)[sel]
    kt = index.long()[sel]
    order = torch.argsort(kt * t + qt)  # by kv tile, then query tile
    kt, qt = kt[order], qt[order]
    tcount = torch.bincount(kt, minlength=t).to(torch.int32)
    start = torch.cumsum(tcount, 0) - tcount
    slot = torch.arange(len(kt), device=count.device) - start[kt]
    tindex = torch.zeros(t, t, dtype=torch.int32, device=count.device)
    tindex[kt, slot] = qt.to(torch.int32)
    tids = None
    if ids is not None:
        tids = torch.zeros(t, t, dtype=torch.int32, device=count.device)
        tids[kt, slot] = ids[sel][order]
    return tcount, tindex, tids


def layout_tensors(layout) -> dict:
    """The extra tensors the kernel reads, built once per layout: partial-tile bit masks, their ids, and
    the transposed lists for dK/dV."""
    hit = layout._cache.get("triton")
    if hit is not None:
        return hit
    t, tile, n, dev = layout.num_tiles, layout.tile, layout.n, layout.partial_count.device
    if tile % 32:
        raise ValueError(f"tile={tile}: the Triton kernel packs partial-tile masks in 32-bit words; "
                         "expected a multiple of 32")
    cols = torch.arange(t, device=dev)
    psel = cols[None, :] < layout.partial_count[:, None]
    qt = cols[:, None].expand(t, t)[psel]
    kt = layout.partial_index.long()[psel]
    ids = torch.zeros(t, t, dtype=torch.int32, device=dev)
    ids[psel] = torch.arange(len(qt), dtype=torch.int32, device=dev)
    r = torch.arange(tile, device=dev)
    masks = []
    for c in range(0, len(qt), 256):  # evaluate the pattern on the partial tiles only, a few at a time
        i = (qt[c:c + 256, None, None] * tile + r[None, :, None])
        j = (kt[c:c + 256, None, None] * tile + r[None, None, :])
        keep = layout.pattern.kernel_keep(i.clamp(max=n - 1), j.clamp(max=n - 1)) & (i < n) & (j < n)
        masks.append(_pack_bits(keep.expand(len(i), tile, tile).contiguous()))
    bits = torch.cat(masks) if masks else torch.zeros(1, tile, tile // 32, dtype=torch.int32, device=dev)
    fq = _transpose(layout.full_count, layout.full_index, None)
    pq = _transpose(layout.partial_count, layout.partial_index, ids)
    hit = {"bits": bits.contiguous(), "ids": ids, "full_t": fq[:2], "partial_t": pq}
    layout._cache["triton"] = hit
    return hit


# ---------------------------------------------------------------------------- kernels
if triton is not None:
    def _configs(kind):
        if interpreted():
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        shapes = {
            "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
            "dkdv": [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 4, 2)],
            "dq": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 2)],
        }[kind]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": nn}, num_warps=w, num_stages=s) for m, nn, w, s in shapes]

    def _prune(configs, named_args, **kw):
        tile = named_args["TILE"] if "TILE" in named_args else kw["TILE"]
        kept = [c for c in configs if tile % c.kwargs["BLOCK_M"] == 0 and tile % c.kwargs["BLOCK_N"] == 0]
        return kept or [triton.Config({"BLOCK_M": min(32, tile), "BLOCK_N": min(32, tile)}, num_warps=4,
                                      num_stages=1)]

    @triton.jit
    def _mask_bits(bits_ptr, mid, rows, cols, TILE: tl.constexpr):
        """Bool [rows, cols] of partial tile ``mid`` (rows/cols: offsets inside the tile)."""
        words = tl.load(bits_ptr + mid * (TILE * (TILE // 32)) + rows[:, None] * (TILE // 32) + (cols // 32)[None, :])
        return ((words >> (cols % 32)[None, :]) & 1) != 0

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kpm_base, bits_ptr, mid, kt, row0, offs_m_tile, N,
                  stride_kn, stride_vn, sm_scale, PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  TILE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for sub in tl.static_range(TILE // BLOCK_N):
            cols = sub * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_n = kt * TILE + cols
            valid = offs_n < N
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            keep = valid[None, :]
            if HAS_KPM:
                keep = keep & (tl.load(kpm_base + offs_n, mask=valid, other=0) != 0)[None, :]
            if PARTIAL:
                keep = keep & _mask_bits(bits_ptr, mid, offs_m_tile, cols, TILE)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.autotune(configs=_configs("fwd"), key=["N", "HEAD_DIM", "TILE", "GROUPS"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _fwd_kernel(Q, K, V, OUT, LSE, KPM, BITS, FC, FI, PC, PI, IDS,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    H, N, T_TILES, sm_scale,
                    GROUPS: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUPS
        row0 = pid_m * BLOCK_M
        qt = row0 // TILE
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_m_tile = offs_m - qt * TILE
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=(offs_m < N)[:, None],
                    other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        kpm_base = KPM + b * N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below
        for slot in range(0, tl.load(FC + qt)):
            kt = tl.load(FI + qt * T_TILES + slot)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, 0, kt, row0, offs_m_tile,
                                      N, skn, svn, qk_scale, False, HAS_KPM, TILE, BLOCK_N, HEAD_DIM)
        for slot in range(0, tl.load(PC + qt)):
            kt = tl.load(PI + qt * T_TILES + slot)
            mid = tl.load(IDS + qt * T_TILES + slot)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, mid, kt, row0, offs_m_tile,
                                      N, skn, svn, qk_scale, True, HAS_KPM, TILE, BLOCK_N, HEAD_DIM)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 domain; 0 for empty rows
        tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(offs_m < N)[:, None])
        tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)

    @triton.jit
    def _bwd_p(q, k, do, v, lse, delta, keep, qk_scale):
        """p [M, N] and ds [M, N] for one (query block, key block)."""
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        return p, ds

    @triton.jit
    def _keep(offs_m, offs_n, offs_m_tile, cols, N, kpm_base, bits_ptr, mid, PARTIAL: tl.constexpr,
              HAS_KPM: tl.constexpr, TILE: tl.constexpr):
        keep = (offs_n < N)[None, :] & (offs_m < N)[:, None]
        if HAS_KPM:
            keep = keep & (tl.load(kpm_base + offs_n, mask=offs_n < N, other=0) != 0)[None, :]
        if PARTIAL:
            keep = keep & _mask_bits(bits_ptr, mid, offs_m_tile, cols, TILE)
        return keep

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, bits_ptr, mid, qt, offs_n,
                   cols, N, sqn, sdon, qk_scale, PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for sub in tl.static_range(TILE // BLOCK_M):
            offs_m_tile = sub * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_m = qt * TILE + offs_m_tile
            rows = offs_m < N
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdon + offs_d[None, :], mask=rows[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
            keep = _keep(offs_m, offs_n, offs_m_tile, cols, N, kpm_base, bits_ptr, mid, PARTIAL, HAS_KPM, TILE)
            p, ds = _bwd_p(q, k, do, v, lse, delta, keep, qk_scale)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        return dk, dv

    @triton.autotune(configs=_configs("dkdv"), key=["N", "HEAD_DIM", "TILE", "GROUPS"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, BITS, FCT, FIT, PCT, PIT, IDST,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                     HK, H, N, T_TILES, sm_scale,
                     GROUPS: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // HK
        hk = bhk % HK
        col0 = pid_n * BLOCK_N
        kt = col0 // TILE
        cols = col0 - kt * TILE + tl.arange(0, BLOCK_N)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kmask = (offs_n < N)[:, None]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        kpm_base = KPM + b * N
        for g in range(0, GROUPS):
            h = hk * GROUPS + g
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
            lse_base = LSE + (b * H + h) * N
            delta_base = DELTA + (b * H + h) * N
            for slot in range(0, tl.load(FCT + kt)):
                qt = tl.load(FIT + kt * T_TILES + slot)
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, BITS, 0, qt,
                                    offs_n, cols, N, sqn, sdon, qk_scale, False, HAS_KPM, TILE, BLOCK_M, HEAD_DIM)
            for slot in range(0, tl.load(PCT + kt)):
                qt = tl.load(PIT + kt * T_TILES + slot)
                mid = tl.load(IDST + kt * T_TILES + slot)
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, BITS, mid, qt,
                                    offs_n, cols, N, sqn, sdon, qk_scale, True, HAS_KPM, TILE, BLOCK_M, HEAD_DIM)
        out = (bhk * N + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, bits_ptr, mid, kt, offs_m, offs_m_tile, N,
                 skn, svn, qk_scale, PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for sub in tl.static_range(TILE // BLOCK_N):
            cols = sub * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_n = kt * TILE + cols
            valid = (offs_n < N)[:, None]
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=valid, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=valid, other=0.0)
            keep = _keep(offs_m, offs_n, offs_m_tile, cols, N, kpm_base, bits_ptr, mid, PARTIAL, HAS_KPM, TILE)
            p, ds = _bwd_p(q, k, do, v, lse, delta, keep, qk_scale)
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.autotune(configs=_configs("dq"), key=["N", "HEAD_DIM", "TILE", "GROUPS"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, BITS, FC, FI, PC, PI, IDS,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                   H, N, T_TILES, sm_scale,
                   GROUPS: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUPS
        row0 = pid_m * BLOCK_M
        qt = row0 // TILE
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_m_tile = offs_m - qt * TILE
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :], mask=rows[:, None],
                     other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=rows, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=rows, other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        kpm_base = KPM + b * N
        qk_scale = sm_scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for slot in range(0, tl.load(FC + qt)):
            kt = tl.load(FI + qt * T_TILES + slot)
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, 0, kt, offs_m, offs_m_tile, N,
                          skn, svn, qk_scale, False, HAS_KPM, TILE, BLOCK_N, HEAD_DIM)
        for slot in range(0, tl.load(PC + qt)):
            kt = tl.load(PI + qt * T_TILES + slot)
            mid = tl.load(IDS + qt * T_TILES + slot)
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, mid, kt, offs_m, offs_m_tile, N,
                          skn, svn, qk_scale, True, HAS_KPM, TILE, BLOCK_N, HEAD_DIM)
        tl.store(DQ + (bh * N + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=rows[:, None])


# ---------------------------------------------------------------------------- autograd
def _strides(t):
    assert t.stride(-1) == 1  # checked by the caller: head_dim contiguous
    return t.stride(0), t.stride(1), t.stride(2)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, kpm, scale):
        b, h, n, d = q.shape
        hk = k.shape[1]
        extra = layout_tensors(layout)
        o = torch.empty(b, h, n, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        kpm_t = kpm.to(torch.int8).contiguous() if kpm is not None else torch.ones(1, device=q.device,
                                                                                  dtype=torch.int8)
        t = layout.num_tiles

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]), b * h)
        _fwd_kernel[grid](q, k, v, o, lse, kpm_t, extra["bits"], layout.full_count, layout.full_index,
                          layout.partial_count, layout.partial_index, extra["ids"],
                          *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                          h, n, t, scale, GROUPS=h // hk, HAS_KPM=kpm is not None, TILE=layout.tile, HEAD_DIM=d)
        ctx.save_for_backward(q, k, v, o, lse, kpm_t)
        ctx.layout, ctx.scale, ctx.has_kpm = layout, scale, kpm is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm_t = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        b, h, n, d = q.shape
        hk = k.shape[1]
        extra = layout_tensors(layout)
        if do.stride(-1) != 1:
            do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).contiguous()  # rowsum(dO * O), [B, H, N]
        dq = torch.empty(b, h, n, d, device=q.device, dtype=q.dtype)
        dk = torch.empty(b, hk, n, d, device=q.device, dtype=k.dtype)
        dv = torch.empty(b, hk, n, d, device=q.device, dtype=v.dtype)
        t = layout.num_tiles
        kw = dict(GROUPS=h // hk, HAS_KPM=ctx.has_kpm, TILE=layout.tile, HEAD_DIM=d)
        fct, fit = extra["full_t"]
        pct, pit, idst = extra["partial_t"]
        _dkdv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * hk)](
            q, k, v, do, lse, delta, dk, dv, kpm_t, extra["bits"], fct, fit, pct, pit, idst,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), hk, h, n, t, scale, **kw)
        _dq_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
            q, k, v, do, lse, delta, dq, kpm_t, extra["bits"], layout.full_count, layout.full_index,
            layout.partial_count, layout.partial_index, extra["ids"],
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), h, n, t, scale, **kw)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q, k, v, layout, key_padding_mask=None, scale=None) -> torch.Tensor:
    """``[B, Hq, N, D]`` attention over ``layout``'s tiles (its kernel part: global rows come out 0)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _BlockSparseAttention.apply(q, k, v, layout, key_padding_mask, scale)
