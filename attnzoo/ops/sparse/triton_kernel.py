"""attnzoo's block-sparse FlashAttention kernels in Triton (forward and backward).

Two ways to walk the keys, chosen per pattern (:func:`plan`):

* **band** (``sliding_window``, ``longformer``): query ``i`` keeps key ``j`` when
  ``lo <= j - i <= hi`` (plus, for Longformer, a short list of global key columns). A
  block of queries reads one *contiguous* run of keys, split in three stages: the edges
  evaluate the band (two integer compares per score), the middle runs with no mask at all.
  No index tables, so loads are sequential and software-pipelined. Global key columns
  outside the band are a fourth, gathered stage (forward, dQ); their dK/dV, which every
  query feeds, are a few small dense products in the backward.
* **list** (``bigbird``, ``sparse_strided``, ``sparse_fixed``, any pattern): the compiled
  :class:`~attnzoo.ops.sparse.layout.BlockLayout`: each query tile visits its full tiles with
  no mask and its partial tiles with a mask, which is arithmetic (bounds and causality) when
  the pattern is exact on its tiles (:meth:`Pattern.tile_exact`: BigBird with tiles that divide
  its blocks) and otherwise a bit-packed copy of the pattern (one bit per pair, 2 KiB per
  128x128 tile), so any pattern runs.

Three kernels per call, as FlashAttention-2: the forward (one program per block of queries and
head: online softmax, output and log-sum-exp), dQ (which also writes ``rowsum(dO * O)``) and dK/dV
(one program per block of keys and KV head, looping over its query heads: grouped KV heads without
atomics). Tile sizes and warps are tuned once per kernel variant (:func:`_config`; the
``autotune`` field of :class:`~attnzoo.ops.sparse.options.SparseKernelOptions` off: the first configuration
that fits, no tuning runs, for tests and quick runs); launches go through Triton's public ``kernel[grid](...)``.

List mode schedules the work: query tiles run heaviest first (all heads of the longest lists
before any short one), and a KV tile visited by many more query tiles than the others (a global
block: every query reads it) is split over several dK/dV programs, which add their parts into a
float32 scratch; the last of them to finish writes the tile. Rows of global *queries* are part of
the list when they fill whole tiles and the pattern is exact on its tiles (BigBird with tiles =
blocks: :func:`rows_in_kernel`); otherwise, and in band mode, the op overwrites them with a dense
computation (:func:`attnzoo.ops.sparse.backends.fill_global_rows`). The float64 reference for
every path is the dense keep mask through :func:`attnzoo.ops.attention_reference`
(tests/test_sparse_triton.py, under Triton's interpreter on CPU; tests/test_sparse_gpu.py compiled).

Importable without Triton: :func:`available` says why it cannot run.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .options import SparseKernelOptions, sparse_kernel_options

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional; attnzoo works without Triton
    triton = None

__all__ = ["available", "interpreted", "plan", "rows_in_kernel", "KernelPlan", "block_sparse_attention"]

BAND, LIST = 0, 1
#: Query blocks per program of the forward's redo launch (stage 2 of :func:`_fwd_kernel`).
REDO_CHUNK = 32


def interpreted() -> bool:
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


# ---------------------------------------------------------------------------- plans
@dataclass(eq=False)
class KernelPlan:
    """What the kernels read for one layout (built once, cached on the layout).

    ``mode``: BAND or LIST. Band: keys ``lo <= j - i <= hi``; ``gpos`` int32 ``[G]`` global key
    columns (G may be 0). List: ``lists`` = (full count, full index, partial count, partial index)
    per query tile (the layout's, plus the global rows' tiles when ``rows``), ``order`` the query
    tiles heaviest first, the transposed lists for dK/dV with their work ``items`` (int32
    ``[items, 5]``: KV tile, first and last slot, split id or -1, parts of that tile) and
    ``n_split`` split KV tiles; for patterns that are not exact on their tiles the bit-packed
    partial masks ``bits`` with ``ids``.
    """

    mode: int
    causal: bool
    lo: int = 0
    hi: int = 0
    gpos: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    lists: tuple | None = None
    order: torch.Tensor | None = None
    full_t: tuple | None = None
    partial_t: tuple | None = None
    items: torch.Tensor | None = None
    n_split: int = 0
    rows: bool = False

    @property
    def n_global(self) -> int:
        return 0 if self.gpos is None else int(self.gpos.numel())


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
    tids = torch.zeros(t, t, dtype=torch.int32, device=count.device)
    if ids is not None:
        tids[kt, slot] = ids[sel][order]
    return tcount, tindex, tids


def _partial_bits(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-packed masks of the layout's partial tiles and their ids per (query tile, slot)."""
    t, tile, n, dev = layout.num_tiles, layout.tile, layout.n, layout.partial_count.device
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
    return bits.contiguous(), ids


def rows_in_kernel(layout) -> bool:
    """True when the list-mode kernels compute the global rows themselves: the pattern is exact on the
    layout's tiles and its global rows fill whole tiles (BigBird with tiles = blocks)."""
    hit = layout._cache.get("rows_in_kernel")
    if hit is None:
        bound, tile, n = layout.pattern, layout.tile, layout.n
        rows = bound.global_rows.cpu()
        hit = False
        if rows.numel() and bound.pattern.band() is None and bound.pattern.tile_exact(tile):
            per_tile = torch.bincount(rows // tile, minlength=layout.num_tiles)
            size = (n - torch.arange(layout.num_tiles) * tile).clamp(max=tile)
            hit = bool(((per_tile == 0) | (per_tile == size)).all())
        layout._cache["rows_in_kernel"] = hit
    return hit


def _with_global_rows(layout):
    """The layout's lists with every global query tile visiting all KV tiles (causal: the earlier ones full,
    its own partial under the causal mask)."""
    t = layout.num_tiles
    fc, fi = layout.full_count.clone(), layout.full_index.clone()
    pc, pi = layout.partial_count.clone(), layout.partial_index.clone()
    dev = fc.device
    cols = torch.arange(t, dtype=torch.int32, device=dev)
    for qt in torch.unique(layout.pattern.global_rows // layout.tile).tolist():
        if layout.pattern.causal:
            fc[qt], fi[qt], pc[qt] = qt, cols, 1
            pi[qt] = torch.roll(cols, -qt)  # slot 0: the diagonal tile
        else:
            fc[qt], fi[qt], pc[qt] = t, cols, 0
    return fc, fi, pc, pi


def _items(tcount: torch.Tensor, split_min: int, split_factor: int) -> tuple[torch.Tensor, int]:
    """dK/dV work items from the per-KV-tile list lengths: long lists (longer than ``max(split_min, split_factor x
    the mean list)``) split in parts, heaviest first."""
    counts = tcount.tolist()
    busy = [c for c in counts if c]
    chunk = max(split_min, split_factor * -(-sum(busy) // max(1, len(busy))))
    items, n_split = [], 0
    for kt, c in enumerate(counts):
        if c <= chunk:
            items.append((c, kt, 0, c, -1, 1))
            continue
        parts = -(-c // chunk)
        for p in range(parts):
            lo = p * c // parts
            hi = (p + 1) * c // parts
            items.append((hi - lo, kt, lo, hi, n_split, parts))
        n_split += 1
    items.sort(key=lambda it: -it[0])
    table = torch.tensor([it[1:] for it in items], dtype=torch.int32, device=tcount.device)
    return table.contiguous(), n_split


def plan(layout, rows: bool = False, options: SparseKernelOptions | None = None) -> KernelPlan:
    """The :class:`KernelPlan` of ``layout`` (cached on it); ``rows``: the kernels also compute the global
    rows (list mode, where :func:`rows_in_kernel` holds); ``options``: the split thresholds (default: the options
    in force, :func:`~attnzoo.ops.sparse.options.sparse_kernel_options`)."""
    rows = rows and rows_in_kernel(layout)
    options = options or sparse_kernel_options()
    key = ("triton", rows, options.split_min, options.split_factor)
    hit = layout._cache.get(key)
    if hit is not None:
        return hit
    bound = layout.pattern
    pattern = bound.pattern
    band = pattern.band()
    if band is not None:
        gpos = bound.global_rows.to(torch.int32).contiguous()
        hit = KernelPlan(BAND, pattern.causal, band[0], band[1], gpos=gpos if gpos.numel() else None)
    else:
        bits = ids = None
        if not pattern.tile_exact(layout.tile):
            if layout.tile % 32:
                raise ValueError(f"tile={layout.tile}: the Triton kernel packs partial-tile masks of "
                                 f"{pattern.describe()} in 32-bit words; expected a multiple of 32")
            bits, ids = _partial_bits(layout)
        lists = _with_global_rows(layout) if rows else (layout.full_count, layout.full_index,
                                                        layout.partial_count, layout.partial_index)
        fc, fi, pc, pi = lists
        order = torch.argsort(-(fc + pc).long(), stable=True).to(torch.int32)
        fq = _transpose(fc, fi, None)
        pq = _transpose(pc, pi, ids)
        items, n_split = _items(fq[0] + pq[0], options.split_min, options.split_factor)
        hit = KernelPlan(LIST, pattern.causal, bits=bits, ids=ids, lists=lists, order=order, full_t=fq[:2],
                         partial_t=pq, items=items, n_split=n_split, rows=rows)
    layout._cache[key] = hit
    return hit


# ---------------------------------------------------------------------------- kernels
if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)
    _REDO_CHUNK = tl.constexpr(REDO_CHUNK)

    def _configs(kind) -> list[dict]:
        """Tile configurations to try per kernel kind, as launch keyword arguments (first: the default)."""
        if interpreted():
            return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)]
        shapes = {  # (BLOCK_M, BLOCK_N, warps, stages); the first ones won a 108-config sweep on an H200 (band, d=64)
            "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
                    (128, 128, 8, 3)],
            "dkdv": [(32, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3),
                     (32, 128, 8, 4)],
            "dq": [(64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3),
                   (64, 64, 4, 4)],
        }[kind]
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    _CONFIGS = {kind: _configs(kind) for kind in ("fwd", "dq", "dkdv")}

    @triton.jit
    def _bits_keep(bits_ptr, mid, rows, cols, TILE: tl.constexpr):
        """Bool [rows, cols] of partial tile ``mid`` (rows/cols: offsets inside the tile)."""
        words = tl.load(bits_ptr + mid * (TILE * (TILE // 32)) + rows[:, None] * (TILE // 32) + (cols // 32)[None, :])
        return ((words >> (cols % 32)[None, :]) & 1) != 0

    @triton.jit
    def _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, TILE: tl.constexpr):
        """Bool [M, N] of kept pairs. MASK: 0 or 5 bounds only (0: the caller skips the mask), 1 band, 2 causal,
        3 bits, 4 outside the band (global columns, ``offs_n`` then holds their positions)."""
        keep = (offs_n < N)[None, :] & (offs_m >= 0)[:, None]
        if MASK == 1:
            dd = offs_n[None, :] - offs_m[:, None]
            keep = keep & (dd >= LO) & (dd <= HI)
        if MASK == 2:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if MASK == 3:
            keep = keep & _bits_keep(bits_ptr, mid, rows_t, cols_t, TILE)
        if MASK == 4:
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
        if MASK == 1:
            dd = offs_n[:, None] - offs_m[None, :]
            keep = keep & (dd >= LO) & (dd <= HI)
        if MASK == 2:
            keep = keep & (offs_n[:, None] <= offs_m[None, :])
        if MASK == 3:
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
        if MASK == 0 and not HAS_KPM:
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
            if MASK != 0 or HAS_KPM:
                keep = _keep(offs_m, offs_n, N, LO, HI, kpm_base, bits_ptr, mid, rows_t, cols_t, MASK, CAUSAL,
                             HAS_KPM, TILE)
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = acc + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            return acc, m_i, l_i
        if MASK == 0 and not HAS_KPM:
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
        if MODE == 0:
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
        if MODE == 0:
            if FIXED_M:  # the self-scores q_i . k_i, in the exponent's units
                kd = tl.load(k_base + offs_m[:, None] * skn + offs_d[None, :], mask=(offs_m < N)[:, None], other=0.0)
                m_i = tl.sum(q.to(tl.float32) * kd.to(tl.float32), 1) * qk_scale
            start, a, bb, end = _band_stages(q0, tl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, start, a, N, LO, HI,
                                       skn, svn, qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, a, bb, N, LO, HI,
                                       skn, svn, qk_scale, 0, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, k_base, v_base, kpm_base, offs_m, bb, end, N, LO, HI,
                                       skn, svn, qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC, FIXED_M)
            if HAS_GLOBAL:
                for g0 in range(0, G, BLOCK_N):
                    offs_g = g0 + tl.arange(0, BLOCK_N)
                    pos = tl.load(GPOS + offs_g, mask=offs_g < G, other=N)  # N: out of bounds, masked
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, kpm_base, BITS, 0, offs_m, pos,
                                               offs_m, pos, N, LO, HI, skn, svn, qk_scale, 4, CAUSAL, HAS_KPM, TILE,
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
        if STAGE == 2:
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
                                  HAS_KPM, HAS_GLOBAL, TILE, HEAD_DIM, False, BLOCK_M, BLOCK_N)
        else:
            pid_m, bh, _, _, _ = _query_program(ORDER, H, GROUPS, MODE)
            _fwd_tile(Q, K, V, OUT, LSE, KPM, GPOS, BITS, FC, FI, PC, PI, IDS, FLAGS, pid_m, bh,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      H, N, T_TILES, G, LO, HI, sm_scale, GROUPS, MODE, FMASK, PMASK, CAUSAL, PREC,
                      HAS_KPM, HAS_GLOBAL, TILE, HEAD_DIM, STAGE, BLOCK_M, BLOCK_N)

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
        if MASK != 0 or HAS_KPM:
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
        if MODE == 0:
            pid_n = tl.program_id(0)
            bhk = tl.program_id(1)
            lo = 0
            hi = 0
            sid = -1
            parts = 1
        else:  # one work item: KV tile, its query-tile slots [lo, hi), split id (-1: whole tile), parts
            bhk = tl.program_id(0)
            item = ITEMS + tl.program_id(1) * 5
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
            if MODE == 0:  # queries i with LO <= j - i <= HI: i in [j - HI, j - LO]
                start, a, bb, end = _band_stages(k0, tl.minimum(k0 + BLOCK_N, N) - 1, N, -HI, -LO, BLOCK_M)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, start, a,
                                     N, LO, HI, sqn, sdon, qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM, PREC)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, a, bb,
                                     N, LO, HI, sqn, sdon, qk_scale, 0, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM, PREC)
                dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, offs_n, bb, end,
                                     N, LO, HI, sqn, sdon, qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_M, HEAD_DIM, PREC)
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
                                             qk_scale, 0, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
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
        if MODE == 0:
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
        if MASK == 0 and not HAS_KPM:
            kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None])
            vT = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None])
        else:
            inb = (offs_n < N)[None, :]
            kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=inb, other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None], mask=inb, other=0.0)
        s = tl.dot(q, kT, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK != 0 or HAS_KPM:
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
        if MODE == 0:
            start, a, bb, end = _band_stages(q0, tl.minimum(q0 + BLOCK_M, N) - 1, N, LO, HI, BLOCK_N)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, start, a, N, LO, HI, skn, svn,
                           qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, a, bb, N, LO, HI, skn, svn,
                           qk_scale, 0, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            dq = _dq_range(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, bb, end, N, LO, HI, skn, svn,
                           qk_scale, 1, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, PREC)
            if HAS_GLOBAL:
                for g0 in range(0, G, BLOCK_N):
                    offs_g = g0 + tl.arange(0, BLOCK_N)
                    pos = tl.load(GPOS + offs_g, mask=offs_g < G, other=N)
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, kpm_base, BITS, 0, offs_m, pos, offs_m,
                                   pos, N, LO, HI, skn, svn, qk_scale, 4, CAUSAL, HAS_KPM, TILE, HEAD_DIM, PREC)
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


# ---------------------------------------------------------------------------- autograd
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


# ---------------------------------------------------------------------------- configs and launches
_tuned: dict = {}  # (kernel kind, constexprs, dtype, device, autotune) -> launch keyword arguments


def _fitting(kind: str, constexprs: dict) -> list[dict]:
    """The configurations of ``kind`` that fit the call: list mode needs blocks that tile its tiles (the forward and
    dQ: one program per query tile, dK/dV: one per KV tile); band mode takes any."""
    configs = _CONFIGS[kind]
    if constexprs["MODE"] == BAND:
        return configs
    tile = constexprs["TILE"]
    if kind == "dkdv":
        ok = [c for c in configs if c["BLOCK_N"] == tile and tile % c["BLOCK_M"] == 0]
        fallback = dict(BLOCK_M=min(32, tile), BLOCK_N=tile)
    else:
        ok = [c for c in configs if c["BLOCK_M"] == tile and tile % c["BLOCK_N"] == 0]
        fallback = dict(BLOCK_M=tile, BLOCK_N=min(32, tile))
    return ok or [dict(fallback, num_warps=4, num_stages=1 if interpreted() else 3)]


def _config(kind: str, kernel, grid, args: tuple, constexprs: dict, reset=None) -> dict:
    """The launch configuration of this kernel variant: tuned on its first call (each fitting configuration timed
    with ``triton.testing.do_bench``, the fastest kept) unless ``autotune`` is off or only one fits, then the first
    that fits. ``reset()`` runs before each timed launch (buffers a launch must find zeroed)."""
    autotune = sparse_kernel_options().autotune
    key = (kind, tuple(constexprs.items()), args[0].dtype, args[0].device, autotune)
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    fits = _fitting(kind, constexprs)
    cfg = fits[0]
    if autotune and len(fits) > 1 and not interpreted():
        from triton.testing import do_bench

        def timed(c):
            def run():
                if reset is not None:
                    reset()
                kernel[grid(c)](*args, **constexprs, **c)
            try:
                return do_bench(run, warmup=25, rep=100, return_mode="median")
            except Exception:  # noqa: BLE001 - a configuration that does not compile here (resources): not a candidate
                return float("inf")
        times = [timed(c) for c in fits]
        cfg = fits[min(range(len(fits)), key=times.__getitem__)]
        if reset is not None:
            reset()
    _tuned[key] = cfg
    return cfg


def _launch(kind: str, kernel, grid, args: tuple, constexprs: dict, cfg: dict | None = None, reset=None) -> dict:
    """Launch ``kernel`` (a ``triton.jit`` function) with its configuration (:func:`_config`, or ``cfg``) on
    ``grid(cfg)``; returns the configuration it ran."""
    if cfg is None:
        cfg = _config(kind, kernel, grid, args, constexprs, reset)
    kernel[grid(cfg)](*args, **constexprs, **cfg)
    return cfg


def _redo_overflowed(args, constexprs: dict, cfg: dict, blocks: int) -> None:
    """Stage 2 of the forward: redo the query blocks whose fixed reference overflowed (their flags), with the
    running max and the same tiles as stage 1 (``cfg``). One launch of ``blocks / REDO_CHUNK`` programs."""
    grid = (triton.cdiv(blocks, REDO_CHUNK),)
    _launch("fwd", _fwd_kernel, lambda c: grid, args, {**constexprs, "STAGE": 2}, cfg=cfg)


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
    return (options.fixed_reference and p.mode == BAND and not has_padding and p.lo <= 0 <= p.hi
            and dtype != torch.float16 and p.hi - p.lo >= options.fixed_min_width and rows >= options.fixed_min_rows)


def _precision(dtype) -> str:
    """Dot precision: float32 inputs take TF32 only where torch allows it (``torch.backends.cuda.matmul.allow_tf32``),
    as torch's own float32 attention does; float16/bfloat16 are unaffected."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _list_args(p: KernelPlan, dummy):
    """(bits, full count/index, partial count/index, ids, order) for the forward and dQ kernels; dummies where
    the mode reads none."""
    if p.mode == BAND:
        return (dummy,) * 7
    return (p.bits if p.bits is not None else dummy, *p.lists, p.ids if p.ids is not None else dummy, p.order)


def _grid(p: KernelPlan, n: int, units: int, heads: int, block: str):
    """Band: (blocks of ``block`` along the ``n`` positions, heads); list: (heads, ``units`` work units), heads
    fastest."""
    if p.mode == BAND:
        return lambda meta: (triton.cdiv(n, meta[block]), heads)
    return lambda meta: (heads, units)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, kpm, scale, rows):
        b, h, n, d = q.shape
        hk = k.shape[1]
        options = sparse_kernel_options()
        p = plan(layout, rows, options)
        o = torch.empty(b, h, n, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        dummy = _dummy(q.device)
        kpm_t = kpm.to(torch.int8).contiguous() if kpm is not None else dummy
        gpos = p.gpos if p.n_global else dummy
        kw = dict(GROUPS=h // hk, MODE=p.mode, FMASK=0 if n % layout.tile == 0 else 5,
                  PMASK=3 if p.bits is not None else 2 if p.causal else 5,
                  CAUSAL=p.causal, HAS_KPM=kpm is not None, TILE=layout.tile, HEAD_DIM=d, PREC=_precision(q.dtype))
        fixed = _fixed_reference(p, kpm is not None, q.dtype, b * h * n, options)
        flags = torch.empty(b * h * triton.cdiv(n, 16), device=q.device, dtype=torch.int8) if fixed else dummy
        args = (q, k, v, o, lse, kpm_t, gpos, *_list_args(p, dummy), flags,
                *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                h, n, layout.num_tiles, p.n_global, p.lo, p.hi, scale, b * h)
        cex = dict(HAS_GLOBAL=p.n_global > 0, STAGE=1 if fixed else 0, **kw)
        cfg = _launch("fwd", _fwd_kernel, _grid(p, n, layout.num_tiles, b * h, "BLOCK_M"), args, cex)
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
        _launch("dq", _dq_kernel, _grid(p, n, layout.num_tiles, b * h, "BLOCK_M"),
                (q, k, v, o, do, lse, delta, dq, kpm_t, gpos, *_list_args(p, dummy),
                 *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), h, n, layout.num_tiles,
                 p.n_global, p.lo, p.hi, scale), dict(HAS_GLOBAL=p.n_global > 0, **kw))
        t_args, scr, cnt, units, reset = (dummy,) * 7, _dummy(q.device, torch.float32), dummy, 0, None
        if p.mode == LIST:
            t_args, units = (p.bits if p.bits is not None else dummy, *p.full_t, *p.partial_t, p.items), len(p.items)
            if p.n_split:  # float32 dK/dV parts of the split tiles, and their arrival counters: one zeroed buffer
                size = p.n_split * b * hk * 2 * layout.tile * d
                buf = torch.zeros(size + p.n_split * b * hk, device=q.device, dtype=torch.int32)
                scr, cnt, reset = buf[:size].view(torch.float32), buf[size:], buf.zero_
        _launch("dkdv", _dkdv_kernel, _grid(p, n, units, b * hk, "BLOCK_N"),
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
