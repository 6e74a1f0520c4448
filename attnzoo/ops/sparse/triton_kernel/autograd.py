"""The host side of the kernels: arguments, grids, the autograd function, :func:`block_sparse_attention`.

A call launches the forward (plus, with the fixed softmax reference, the small redo launch), and its backward dQ
(which also writes ``rowsum(dO * O)``) then dK/dV. Longformer's global key columns: in the kernels for the forward
and dQ, and their dK/dV as small dense products here (:func:`_global_dkdv`). The plan comes from :mod:`.plan`, the
configurations from :mod:`.tuning`, the kernels from :mod:`.kernels`.

**Two routes to the same launches.**

* Eager (the default): :class:`_BlockSparseAttention`, an ``autograd.Function``. What does not change from call to
  call (the plan, constexprs, the tuned configuration, grids, the list tensors, the output strides) is computed on
  the first call of a signature and kept on the layout (:class:`_Launches`), so a later call allocates its outputs,
  reads its inputs' strides and launches: no plan lookups, no dictionaries merged, no host syncs.
* Compiled: inside ``torch.compile`` the same launches are the custom ops ``attnzoo::block_sparse_fwd`` and
  ``attnzoo::block_sparse_bwd`` (``torch.library.custom_op`` with fake implementations, their autograd registered
  with ``torch.library.register_autograd``): opaque to Inductor, so the graph does not break around them, for
  CUDA graphs to capture (``mode="reduce-overhead"``; tested on the CPU under Triton's interpreter, not yet
  measured on a GPU). They are not ``triton_op``: Inductor could not recompile
  these kernels (their nested ``triton.jit`` calls failed to compile in Inductor's wrapper on the H200, torch 2.11,
  Triton 3.6). In eager they would cost more host time than the ``autograd.Function`` (a custom op goes through
  the dispatcher), so eager code does not call them.
"""
from __future__ import annotations

import math

import torch

from ..options import SparseKernelOptions, sparse_kernel_options
from .codes import REDO_CHUNK, Mask, Mode, Stage
from .kernels import triton
from .plan import KernelPlan, make_plan
from .tuning import choose_config, tuned_or_first
from ...custom_ops import kernel_op


if triton is not None:
    from .kernels import _dkdv_kernel, _dq_kernel, _fwd_kernel

__all__ = ["block_sparse_attention"]


def _cdiv(a, b):
    return -(-a // b)


_dummies: dict = {}


def _dummy(device, dtype=torch.int32) -> torch.Tensor:
    """A 1-element tensor for pointer arguments a kernel variant does not read (one per device and dtype)."""
    t = _dummies.get((device, dtype))
    if t is None:
        t = _dummies[(device, dtype)] = torch.zeros(1, device=device, dtype=dtype)
    return t


def _global_dkdv(q, k, v, do, lse2, delta, gpos, lo: int, hi: int, causal: bool, kpm, scale, dk, dv):
    """dK/dV of the global key columns ``gpos`` from the queries outside their band ``lo <= j - i <= hi`` (every
    query reads them): small dense products over ``[B, Hkv, groups, N, G]`` scores, added into ``dk``/``dv``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    pos = gpos.long()
    qg = q.view(b, hk, h // hk, n, d).float()
    dog = do.view(b, hk, h // hk, n, d).float()
    kg, vg = k.index_select(2, pos).float(), v.index_select(2, pos).float()  # [B, Hkv, G, D]
    dd = pos[None, :] - torch.arange(n, device=q.device)[:, None]  # [N, G]: key - query
    keep = dd < lo  # the columns outside each query's band (the band part is in the kernel)
    if not causal:
        keep = keep | (dd > hi)
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


class _Launches:
    """The launches of one call signature (plan, shapes, dtype, padding, options), minus the tensors.

    ``traced``: built inside the custom ops (what ``torch.compile`` calls): kernels take the tuned configuration of
    their variant (or the first that fits: no timing runs, which a CUDA-graph capture could not hold), and nothing
    is cached.
    Otherwise the first launch of each kernel chooses (and may tune) its configuration, and later ones reuse the
    keyword arguments and grid kept here.
    """

    def __init__(self, *, mode, causal, lo, hi, n_global, tile, n_tiles, has_bits, units, b, h, hk, n, d, dtype,
                 device, has_kpm, fixed, traced=False):
        self.mode, self.b, self.h, self.hk, self.n, self.d = mode, b, h, hk, n, d
        self.dtype, self.device, self.fixed, self.traced = dtype, device, fixed, traced
        self.units, self.n_tiles, self.tile = units, n_tiles, tile
        kw = dict(GROUPS=h // hk, MODE=mode, FMASK=Mask.NONE if n % tile == 0 else Mask.BOUNDS,
                  PMASK=Mask.BITS if has_bits else Mask.CAUSAL if causal else Mask.BOUNDS,
                  CAUSAL=causal, HAS_KPM=has_kpm, TILE=tile, HEAD_DIM=d, PREC=_precision(dtype))
        self.cex = {"fwd": dict(kw, HAS_GLOBAL=n_global > 0, STAGE=Stage.FIXED if fixed else Stage.RUNNING_MAX),
                    "dq": dict(kw, HAS_GLOBAL=n_global > 0), "dkdv": kw}
        self.fwd_scalars = (h, n, n_tiles, n_global, lo, hi)
        self.dq_scalars = (h, n, n_tiles, n_global, lo, hi)
        self.dkdv_scalars = (hk, h, n, n_tiles, lo, hi)
        self.o_strides = (h * n * d, n * d, d)  # the outputs are contiguous [B, H, N, D]
        self.kept: dict = {}  # kernel kind -> (grid, keyword arguments), after its first launch

    def _grid(self, kind: str, cfg: dict):
        """Band: (blocks along the positions, heads); list: (heads, work units), heads fastest."""
        if kind == "dkdv":
            heads, block, units = self.b * self.hk, cfg["BLOCK_N"], self.units
        else:
            heads, block, units = self.b * self.h, cfg["BLOCK_M"], self.n_tiles
        return (_cdiv(self.n, block), heads) if self.mode == Mode.BAND else (heads, units)

    def _kernel(self, kind: str):
        return {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}[kind]

    def launch(self, kind: str, args: tuple, reset=None) -> dict:
        """Launch kernel ``kind`` on ``args``; returns its keyword arguments (constexprs and configuration)."""
        kept = self.kept.get(kind)
        if kept is not None:
            grid, kw = kept
            self._kernel(kind)[grid](*args, **kw)
            return kw
        kernel, cex = self._kernel(kind), self.cex[kind]
        if self.traced:
            cfg = tuned_or_first(kind, cex, self.dtype, self.device)
            kernel[self._grid(kind, cfg)](*args, **cex, **cfg)
            return {**cex, **cfg}
        cfg = choose_config(kind, kernel, lambda c: self._grid(kind, c), args, cex, reset)
        grid, kw = self._grid(kind, cfg), {**cex, **cfg}
        kernel[grid](*args, **kw)
        self.kept[kind] = (grid, kw)
        return kw

    def redo(self, args: tuple, fwd_kw: dict) -> None:
        """Stage 2 of the forward (:func:`_redo_overflowed`), with the tiles of stage 1 (``fwd_kw``)."""
        kept = self.kept.get("redo")
        if kept is None:
            kept = ((_cdiv(self.b * self.h * _cdiv(self.n, fwd_kw["BLOCK_M"]), REDO_CHUNK),),
                    {**fwd_kw, "STAGE": Stage.REDO})
            if not self.traced:
                self.kept["redo"] = kept
        _redo_overflowed(args, *kept)


def _redo_overflowed(args: tuple, grid: tuple, kw: dict) -> None:
    """Stage 2 of the forward: redo the query blocks whose fixed reference overflowed (their flags), with the
    running max and the same tiles as stage 1. One launch of one program per ``REDO_CHUNK`` query blocks."""
    _fwd_kernel[grid](*args, **kw)


def _forward(L: _Launches, q, k, v, kpm_t, gpos, list_args: tuple, scale: float, dummy):
    """The forward launches: ``(o, lse)``, lse in base 2 (``inf`` for rows that keep nothing)."""
    b, h, n, d = L.b, L.h, L.n, L.d
    o = torch.empty((b, h, n, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    flags = torch.empty(b * h * _cdiv(n, 16), device=q.device, dtype=torch.int8) if L.fixed else dummy
    args = (q, k, v, o, lse, kpm_t, gpos, *list_args, flags, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *L.o_strides, *L.fwd_scalars, scale, b * h)
    kw = L.launch("fwd", args)
    if L.fixed:
        L.redo(args, kw)
    return o, lse


def _backward(L: _Launches, q, k, v, o, lse, do, kpm_t, gpos, list_args: tuple, t_args: tuple, n_split: int,
              scale: float, dummy, dummy_f32):
    """The backward launches: ``(dq, dk, dv, delta)`` for the kernels' part, ``delta = rowsum(dO * O)`` (the
    global key columns' dK/dV: the caller, :func:`_global_dkdv`)."""
    b, h, hk, n, d = L.b, L.h, L.hk, L.n, L.d
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    dq = torch.empty((b, h, n, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hk, n, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hk, n, d), device=q.device, dtype=v.dtype)
    qs, ks, vs, dos = q.stride()[:3], k.stride()[:3], v.stride()[:3], do.stride()[:3]
    # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads
    L.launch("dq", (q, k, v, o, do, lse, delta, dq, kpm_t, gpos, *list_args, *qs, *ks, *vs, *L.o_strides, *dos,
                    *L.dq_scalars, scale))
    scr, cnt, reset = dummy_f32, dummy, None  # read only by split tiles
    if n_split:  # float32 dK/dV parts of the split tiles, and their arrival counters: one zeroed buffer
        size = n_split * b * hk * 2 * L.tile * d
        buf = torch.zeros(size + n_split * b * hk, device=q.device, dtype=torch.int32)
        scr, cnt, reset = buf[:size].view(torch.float32), buf[size:], buf.zero_
    L.launch("dkdv", (q, k, v, do, lse, delta, dk, dv, kpm_t, *t_args, scr, cnt, *qs, *ks, *vs, *dos,
                      *L.dkdv_scalars, scale), reset=reset)
    return dq, dk, dv, delta


class _Prepared:
    """One call signature of the eager route: its :class:`_Launches` and the plan's tensors in argument order
    (kept on the layout, see :func:`_prepared`)."""

    __slots__ = ("plan", "launches", "dummy", "gpos", "list_args", "t_args")

    def __init__(self, p: KernelPlan, L: _Launches, device):
        dummy = _dummy(device)
        self.plan, self.launches, self.dummy = p, L, dummy
        self.gpos = p.gpos if p.n_global else dummy
        if p.mode == Mode.BAND:
            self.list_args, self.t_args = (dummy,) * 7, (dummy,) * 7
        else:
            bits = p.bits if p.bits is not None else dummy
            self.list_args = (bits, *p.lists, p.ids, p.order)
            self.t_args = (bits, *p.full_t, *p.partial_t, p.items)


def _prepared(layout, rows: bool, q, k, has_kpm: bool) -> _Prepared:
    """The :class:`_Prepared` of this call (built on the first call of its signature, kept on the layout)."""
    options = sparse_kernel_options()
    b, h, n, d = q.shape
    hk = k.shape[1]
    prec = q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    key = ("triton-call", rows, options, b, h, hk, d, q.dtype, q.device, has_kpm, prec)
    hit = layout._cache.get(key)
    if hit is None:
        p = make_plan(layout, rows, options)
        L = _Launches(mode=p.mode, causal=p.causal, lo=p.lo, hi=p.hi, n_global=p.n_global, tile=layout.tile,
                      n_tiles=layout.num_tiles, has_bits=p.bits is not None,
                      units=0 if p.items is None else len(p.items), b=b, h=h, hk=hk, n=n, d=d, dtype=q.dtype,
                      device=q.device, has_kpm=has_kpm, fixed=_fixed_reference(p, has_kpm, q.dtype, b * h * n, options))
        hit = layout._cache[key] = _Prepared(p, L, q.device)
    return hit


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, kpm, scale, rows):
        P = _prepared(layout, rows, q, k, kpm is not None)
        kpm_t = kpm.to(torch.int8).contiguous() if kpm is not None else P.dummy
        o, lse = _forward(P.launches, q, k, v, kpm_t, P.gpos, P.list_args, scale, P.dummy)
        ctx.save_for_backward(q, k, v, o, lse, kpm_t)
        ctx.prepared, ctx.scale, ctx.has_kpm = P, scale, kpm is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm_t = ctx.saved_tensors
        P, scale = ctx.prepared, ctx.scale
        p = P.plan
        dq, dk, dv, delta = _backward(P.launches, q, k, v, o, lse, do, kpm_t, P.gpos, P.list_args, P.t_args,
                                      p.n_split, scale, P.dummy, _dummy(q.device, torch.float32))
        if p.n_global:
            _global_dkdv(q, k, v, do, lse, delta, p.gpos, p.lo, p.hi, p.causal,
                         kpm_t.bool() if ctx.has_kpm else None, scale, dk, dv)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------- the compiled route: custom ops
def _opt(t, dummy):
    return dummy if t is None else t


def _op_launches(q, k, kpm, gpos, bits, lists: tuple, items, mode, causal, lo, hi, tile, n_tiles, fixed):
    """What both custom ops build first: the launches (not cached), a stand-in for absent tensors, the padding
    as int8 and the list arguments."""
    b, h, n, d = q.shape
    dummy = torch.zeros(1, device=q.device, dtype=torch.int32)
    L = _Launches(mode=mode, causal=causal, lo=lo, hi=hi, n_global=0 if gpos is None else gpos.shape[0], tile=tile,
                  n_tiles=n_tiles, has_bits=bits is not None, units=0 if items is None else items.shape[0], b=b, h=h,
                  hk=k.shape[1], n=n, d=d, dtype=q.dtype, device=q.device, has_kpm=kpm is not None, fixed=fixed,
                  traced=True)
    kpm_t = dummy if kpm is None else kpm.to(torch.int8).contiguous()
    return L, dummy, kpm_t, tuple(_opt(t, dummy) for t in (bits, *lists))


def _fwd_op_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
                 gpos: torch.Tensor | None, bits: torch.Tensor | None, fc: torch.Tensor | None,
                 fi: torch.Tensor | None, pc: torch.Tensor | None, pi: torch.Tensor | None, ids: torch.Tensor | None,
                 order: torch.Tensor | None, fct: torch.Tensor | None, fit: torch.Tensor | None,
                 pct: torch.Tensor | None, pit: torch.Tensor | None, idst: torch.Tensor | None,
                 items: torch.Tensor | None, mode: int, causal: bool, lo: int, hi: int, tile: int, n_tiles: int,
                 n_split: int, scale: float, fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``attnzoo::block_sparse_fwd``: ``(o, lse)``. The plan's tensors as arguments (None where the mode reads
    none; the transposed lists ``fct .. items`` are only kept for the backward)."""
    L, dummy, kpm_t, list_args = _op_launches(q, k, kpm, gpos, bits, (fc, fi, pc, pi, ids, order), items, mode,
                                              causal, lo, hi, tile, n_tiles, fixed)
    return _forward(L, q, k, v, kpm_t, _opt(gpos, dummy), list_args, scale, dummy)


def _bwd_op_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, kpm: torch.Tensor | None, gpos: torch.Tensor | None, bits: torch.Tensor | None,
                 fc: torch.Tensor | None, fi: torch.Tensor | None, pc: torch.Tensor | None, pi: torch.Tensor | None,
                 ids: torch.Tensor | None, order: torch.Tensor | None, fct: torch.Tensor | None,
                 fit: torch.Tensor | None, pct: torch.Tensor | None, pit: torch.Tensor | None,
                 idst: torch.Tensor | None, items: torch.Tensor | None, mode: int, causal: bool, lo: int, hi: int,
                 tile: int, n_tiles: int, n_split: int, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attnzoo::block_sparse_bwd``: ``(dq, dk, dv)``, the global key columns' dK/dV included."""
    L, dummy, kpm_t, list_args = _op_launches(q, k, kpm, gpos, bits, (fc, fi, pc, pi, ids, order), items, mode,
                                              causal, lo, hi, tile, n_tiles, False)
    t_args = tuple(_opt(t, dummy) for t in (bits, fct, fit, pct, pit, idst, items))
    dq, dk, dv, delta = _backward(L, q, k, v, o, lse, do, kpm_t, _opt(gpos, dummy), list_args, t_args, n_split,
                                  scale, dummy, torch.zeros(1, device=q.device, dtype=torch.float32))
    if gpos is not None:
        _global_dkdv(q, k, v, do, lse, delta, gpos, lo, hi, causal, kpm, scale, dk, dv)
    return dq, dk, dv


_N_PLAN = 14  # the fwd op's tensors after q, k, v: kpm, gpos, bits, 4 lists, ids, order, 4 transposed lists, items


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    plan_tensors = inputs[3:3 + _N_PLAN]
    ctx.save_for_backward(q, k, v, output[0], output[1], *plan_tensors)
    ctx.ints = inputs[3 + _N_PLAN:-1]  # mode, causal, lo, hi, tile, n_tiles, n_split, scale (fixed: forward only)


def _op_backward(ctx, do, dlse):
    q, k, v, o, lse, *plan_tensors = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnzoo.block_sparse_bwd(q, k, v, o, lse, do, *plan_tensors, *ctx.ints)
    return (dq, dk, dv) + (None,) * (len(ctx.ints) + 1 + _N_PLAN)


_ops: dict = {}


def _fwd_fake(q, k, v, *args):
    """Shapes, dtypes *and strides* of what ``_forward`` returns: contiguous, whatever the inputs' strides (q, k, v
    are often views of one projection; ``empty_like`` would copy their strides and Inductor would then check the
    real outputs against the wrong ones)."""
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32)


def _bwd_fake(q, k, v, *args):
    """Contiguous, as ``_backward`` allocates them (see ``_fwd_fake``)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register_ops() -> None:
    """Register ``attnzoo::block_sparse_fwd`` / ``_bwd`` (at import; not where this torch or Triton cannot)."""
    if triton is None:
        return
    ops = {"fwd": kernel_op("block_sparse_fwd", _fwd_op_impl, _fwd_fake, backward=_op_backward,
                            setup_context=_setup_context),
           "bwd": kernel_op("block_sparse_bwd", _bwd_op_impl, _bwd_fake)}
    _ops.update({k: op for k, op in ops.items() if op is not None})


_register_ops()


def _compiled_route(q, k, v, layout, kpm, scale: float, rows: bool) -> torch.Tensor:
    """The call through the custom ops (what ``torch.compile`` traces)."""
    options = sparse_kernel_options()
    p = make_plan(layout, rows, options)
    b, h, n, _ = q.shape
    fixed = _fixed_reference(p, kpm is not None, q.dtype, b * h * n, options)
    lists = p.lists or (None,) * 4
    full_t = p.full_t or (None,) * 2
    partial_t = p.partial_t or (None,) * 3
    o, _ = torch.ops.attnzoo.block_sparse_fwd(
        q, k, v, kpm, p.gpos if p.n_global else None, p.bits, *lists, p.ids, p.order, *full_t, *partial_t, p.items,
        p.mode, p.causal, p.lo, p.hi, layout.tile, layout.num_tiles, p.n_split, scale, fixed)
    return o


def block_sparse_attention(q, k, v, layout, key_padding_mask=None, scale=None, rows=False, *,
                           compiled: bool | None = None) -> torch.Tensor:
    """``[B, Hq, N, D]`` attention over ``layout``'s pattern. q, k, v: ``[B, H, N, D]`` with a contiguous last dim.
    Global rows: with ``rows`` and where :func:`~.plan.rows_in_kernel` holds, computed here; otherwise they come out
    as the kernel part leaves them (empty: zeros) and the op overwrites them. ``compiled``: take the custom ops
    (default: inside ``torch.compile`` only; True also in eager, for tests)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    if compiled and "fwd" in _ops:
        return _compiled_route(q, k, v, layout, key_padding_mask, scale, rows)
    return _BlockSparseAttention.apply(q, k, v, layout, key_padding_mask, scale, rows)
