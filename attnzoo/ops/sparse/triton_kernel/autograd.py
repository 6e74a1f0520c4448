"""The host side of the kernels: arguments, grids, the autograd function, :func:`block_sparse_attention`.

A call launches the forward (plus, with the fixed softmax reference, the small redo launch), and its backward dQ
(which also writes ``rowsum(dO * O)``) then dK/dV. Longformer's global key columns: in the kernels for the forward
and dQ, and their dK/dV as small dense products here (:func:`_global_dkdv`). The plan comes from :mod:`.plan`, the
configurations from :mod:`.tuning`, the kernels from :mod:`.kernels`.
"""
from __future__ import annotations

import math

import torch

from ..options import SparseKernelOptions, sparse_kernel_options
from .codes import REDO_CHUNK, Mask, Mode, Stage
from .kernels import triton
from .plan import KernelPlan, make_plan
from .tuning import launch

if triton is not None:
    from .kernels import _dkdv_kernel, _dq_kernel, _fwd_kernel

__all__ = ["block_sparse_attention"]


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _global_dkdv(q, k, v, do, lse2, delta, p: KernelPlan, kpm, scale, dk, dv):
    """dK/dV of the global key columns from the queries outside their band (every query reads them):
    small dense products over ``[B, Hkv, groups, N, G]`` scores, added into ``dk``/``dv``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    pos = p.gpos.long()
    qg = q.view(b, hk, h // hk, n, d).float()
    dog = do.view(b, hk, h // hk, n, d).float()
    kg, vg = k.index_select(2, pos).float(), v.index_select(2, pos).float()  # [B, Hkv, G, D]
    dd = pos[None, :] - torch.arange(n, device=q.device)[:, None]  # [N, G]: key - query
    keep = dd < p.lo  # the columns outside each query's band (the band part is in the kernel)
    if not p.causal:
        keep = keep | (dd > p.hi)
    keep = keep[None, None, None]
    if kpm is not None:
        keep = keep & kpm.index_select(1, pos)[:, None, None, None, :]
    s = torch.einsum("zkgnd,zkjd->zkgnj", qg, kg) * scale
    lse = (lse2 * math.log(2.0)).view(b, hk, h // hk, n, 1)
    prob = torch.where(keep, torch.exp(s - lse), 0.0)
    dv_g = torch.einsum("zkgnj,zkgnd->zkjd", prob, dog)
    dp = torch.einsum("zkgnd,zkjd->zkgnj", dog, vg)
    ds = prob * (dp - delta.view(b, hk, h // hk, n, 1))
    dk_g = torch.einsum("zkgnj,zkgnd->zkjd", ds, qg) * scale
    dk.index_add_(2, pos, dk_g.to(dk.dtype))
    dv.index_add_(2, pos, dv_g.to(dv.dtype))


_dummies: dict = {}


def _dummy(device, dtype=torch.int32) -> torch.Tensor:
    """A 1-element tensor for pointer arguments a kernel variant does not read (one per device and dtype)."""
    t = _dummies.get((device, dtype))
    if t is None:
        t = _dummies[(device, dtype)] = torch.zeros(1, device=device, dtype=dtype)
    return t


def _redo_overflowed(args, constexprs: dict, cfg: dict, blocks: int) -> None:
    """Stage 2 of the forward: redo the query blocks whose fixed reference overflowed (their flags), with the
    running max and the same tiles as stage 1 (``cfg``). One launch of ``blocks / REDO_CHUNK`` programs."""
    grid = (triton.cdiv(blocks, REDO_CHUNK),)
    launch("fwd", _fwd_kernel, lambda c: grid, args, {**constexprs, "STAGE": Stage.REDO}, cfg=cfg)


def _fixed_reference(p: KernelPlan, has_padding: bool, dtype, rows: int, options: SparseKernelOptions) -> bool:
    """Whether the forward takes each row's self-score as its fixed softmax reference (stage 1 of
    :func:`_fwd_kernel`) instead of a running max.

    * It needs every row to keep its own key: band mode with ``lo <= 0 <= hi`` and no padding mask (padding could
      drop that key).
    * Not float16: ``p`` goes into the ``P V`` product in the inputs' dtype, and float16 ends at ``2**16``, so a
      kept score 16 log2-units above the self-score (common in trained models) would send the block to the redo;
      bfloat16 and float32 reach ``2**127``.
    * Only where it pays (H200, bf16, head_dim 64, round 8 of ``benchmarks/results/sparse-band-experiments-h200.md``):
      it saves ~4% of a wide band's loop but costs a per-block self-score and the redo launch (~1.5 µs). Measured:
      ±256 at N=16384 and 65536, -4% of the forward; causal ±256 (5 key blocks per query block) and N=4096 x 12
      heads, +1 µs. Hence a band at least ``options.fixed_min_width`` keys wide and at least
      ``options.fixed_min_rows`` query rows (batch x heads x N).
    """
    return (options.fixed_reference and p.mode == Mode.BAND and not has_padding and p.lo <= 0 <= p.hi
            and dtype != torch.float16 and p.hi - p.lo >= options.fixed_min_width and rows >= options.fixed_min_rows)


def _precision(dtype) -> str:
    """Dot precision: float32 inputs take TF32 only where torch allows it (``torch.backends.cuda.matmul.allow_tf32``),
    as torch's own float32 attention does; float16/bfloat16 are unaffected."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _list_args(p: KernelPlan, dummy):
    """(bits, full count/index, partial count/index, ids, order) for the forward and dQ kernels; dummies where
    the mode reads none."""
    if p.mode == Mode.BAND:
        return (dummy,) * 7
    return (p.bits if p.bits is not None else dummy, *p.lists, p.ids if p.ids is not None else dummy, p.order)


def _grid(p: KernelPlan, n: int, units: int, heads: int, block: str):
    """Band: (blocks of ``block`` along the ``n`` positions, heads); list: (heads, ``units`` work units), heads
    fastest."""
    if p.mode == Mode.BAND:
        return lambda meta: (triton.cdiv(n, meta[block]), heads)
    return lambda meta: (heads, units)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, kpm, scale, rows):
        b, h, n, d = q.shape
        hk = k.shape[1]
        options = sparse_kernel_options()
        p = make_plan(layout, rows, options)
        o = torch.empty(b, h, n, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        dummy = _dummy(q.device)
        kpm_t = kpm.to(torch.int8).contiguous() if kpm is not None else dummy
        gpos = p.gpos if p.n_global else dummy
        kw = dict(GROUPS=h // hk, MODE=p.mode, FMASK=Mask.NONE if n % layout.tile == 0 else Mask.BOUNDS,
                  PMASK=Mask.BITS if p.bits is not None else Mask.CAUSAL if p.causal else Mask.BOUNDS,
                  CAUSAL=p.causal, HAS_KPM=kpm is not None, TILE=layout.tile, HEAD_DIM=d, PREC=_precision(q.dtype))
        fixed = _fixed_reference(p, kpm is not None, q.dtype, b * h * n, options)
        flags = torch.empty(b * h * triton.cdiv(n, 16), device=q.device, dtype=torch.int8) if fixed else dummy
        args = (q, k, v, o, lse, kpm_t, gpos, *_list_args(p, dummy), flags,
                *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                h, n, layout.num_tiles, p.n_global, p.lo, p.hi, scale, b * h)
        cex = dict(HAS_GLOBAL=p.n_global > 0, STAGE=Stage.FIXED if fixed else Stage.RUNNING_MAX, **kw)
        cfg = launch("fwd", _fwd_kernel, _grid(p, n, layout.num_tiles, b * h, "BLOCK_M"), args, cex)
        if fixed:
            _redo_overflowed(args, cex, cfg, b * h * triton.cdiv(n, cfg["BLOCK_M"]))
        ctx.save_for_backward(q, k, v, o, lse, kpm_t)
        ctx.layout, ctx.scale, ctx.has_kpm, ctx.kw, ctx.rows, ctx.plan = layout, scale, kpm is not None, kw, rows, p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm_t = ctx.saved_tensors
        layout, scale, kw, p = ctx.layout, ctx.scale, ctx.kw, ctx.plan
        b, h, n, d = q.shape
        hk = k.shape[1]
        if do.stride(-1) != 1:
            do = do.contiguous()
        dummy = _dummy(q.device)
        delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        dq = torch.empty(b, h, n, d, device=q.device, dtype=q.dtype)
        dk = torch.empty(b, hk, n, d, device=q.device, dtype=k.dtype)
        dv = torch.empty(b, hk, n, d, device=q.device, dtype=v.dtype)
        gpos = p.gpos if p.n_global else dummy
        # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads
        launch("dq", _dq_kernel, _grid(p, n, layout.num_tiles, b * h, "BLOCK_M"),
                (q, k, v, o, do, lse, delta, dq, kpm_t, gpos, *_list_args(p, dummy),
                 *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), h, n, layout.num_tiles,
                 p.n_global, p.lo, p.hi, scale), dict(HAS_GLOBAL=p.n_global > 0, **kw))
        t_args, scr, cnt, units, reset = (dummy,) * 7, _dummy(q.device, torch.float32), dummy, 0, None
        if p.mode == Mode.LIST:
            t_args, units = (p.bits if p.bits is not None else dummy, *p.full_t, *p.partial_t, p.items), len(p.items)
            if p.n_split:  # float32 dK/dV parts of the split tiles, and their arrival counters: one zeroed buffer
                size = p.n_split * b * hk * 2 * layout.tile * d
                buf = torch.zeros(size + p.n_split * b * hk, device=q.device, dtype=torch.int32)
                scr, cnt, reset = buf[:size].view(torch.float32), buf[size:], buf.zero_
        launch("dkdv", _dkdv_kernel, _grid(p, n, units, b * hk, "BLOCK_N"),
                (q, k, v, do, lse, delta, dk, dv, kpm_t, *t_args, scr, cnt,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(do), hk, h, n, layout.num_tiles, p.lo, p.hi,
                 scale), kw, reset=reset)
        if p.n_global:
            _global_dkdv(q, k, v, do, lse, delta, p, kpm_t.bool() if ctx.has_kpm else None, scale, dk, dv)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(q, k, v, layout, key_padding_mask=None, scale=None, rows=False) -> torch.Tensor:
    """``[B, Hq, N, D]`` attention over ``layout``'s pattern. q, k, v: ``[B, H, N, D]`` with a contiguous last dim.
    Global rows: with ``rows`` and where :func:`rows_in_kernel` holds, computed here; otherwise they come out as
    the kernel part leaves them (empty: zeros) and the op overwrites them."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _BlockSparseAttention.apply(q, k, v, layout, key_padding_mask, scale, rows)
