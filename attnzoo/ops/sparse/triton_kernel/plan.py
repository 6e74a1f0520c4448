"""What the kernels read for one layout: the :class:`KernelPlan`, built once and cached on the layout.

Band patterns (``sliding_window``, ``longformer``: :meth:`~attnzoo.ops.sparse.patterns.Pattern.band`) need only
the band's bounds and the global key columns. Other patterns walk the layout's lists: for the forward and dQ per
query tile (heaviest first), for dK/dV transposed per KV tile and cut into work items (a KV tile with a much longer
list than the others, a global block, is split over several programs), and, where the pattern is not exact on its
tiles, the partial tiles' masks packed one bit per pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import SparseKernelOptions, sparse_kernel_options
from .codes import Mode

__all__ = ["KernelPlan", "make_plan", "rows_in_kernel"]


@dataclass(eq=False)
class KernelPlan:
    """What the kernels read for one layout (built once, cached on the layout).

    ``mode``: a :class:`~.codes.Mode`. Band: keys ``lo <= j - i <= hi``; ``gpos`` int32 ``[G]`` global key
    columns (G may be 0). List: ``lists`` = (full count, full index, partial count, partial index)
    per query tile (the layout's, plus the global rows' tiles when ``rows``), ``order`` the query
    tiles heaviest first, the transposed lists for dK/dV with their work ``items`` (int32
    ``[items, ITEM_FIELDS]``: KV tile, first and last slot, split id or -1, parts of that tile) and
    ``n_split`` split KV tiles; for patterns that are not exact on their tiles the bit-packed
    partial masks ``bits``, whose index per (query tile, slot) is ``ids`` (zeros for tile-exact patterns).
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


def make_plan(layout, rows: bool = False, options: SparseKernelOptions | None = None) -> KernelPlan:
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
        hit = KernelPlan(Mode.BAND, pattern.causal, band[0], band[1], gpos=gpos if gpos.numel() else None)
    else:
        bits = ids = None
        if not pattern.tile_exact(layout.tile):
            if layout.tile % 32:
                raise ValueError(f"tile={layout.tile}: the Triton kernel packs partial-tile masks of "
                                 f"{pattern.describe()} in 32-bit words; expected a multiple of 32")
            bits, ids = _partial_bits(layout)
        else:  # tile-exact: no bit masks, but the kernels still read an id per partial slot
            ids = torch.zeros(layout.num_tiles, layout.num_tiles, dtype=torch.int32, device=layout.full_count.device)
        lists = _with_global_rows(layout) if rows else (layout.full_count, layout.full_index,
                                                        layout.partial_count, layout.partial_index)
        fc, fi, pc, pi = lists
        order = torch.argsort(-(fc + pc).long(), stable=True).to(torch.int32)
        fq = _transpose(fc, fi, None)
        pq = _transpose(pc, pi, ids)
        items, n_split = _items(fq[0] + pq[0], options.split_min, options.split_factor)
        hit = KernelPlan(Mode.LIST, pattern.causal, bits=bits, ids=ids, lists=lists, order=order, full_t=fq[:2],
                         partial_t=pq, items=items, n_split=n_split, rows=rows)
    layout._cache[key] = hit
    return hit
