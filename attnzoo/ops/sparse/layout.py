"""The layout compiler: a pattern at one length -> which KV tiles each query tile visits.

The ``n x n`` score matrix is cut into ``tile x tile`` tiles. For query tile ``t`` the
layout lists the KV tiles it visits, split in two kinds:

* **full** tiles: every (query, key) pair inside is kept, so a kernel computes them
  without evaluating the mask;
* **partial** tiles: some pairs are kept, so a kernel evaluates the pattern there.

Positions past ``n`` in the last tile do not count (kernels bound-check them). Global
rows are not in the layout: the op computes them densely (one row visiting every tile
would make one query tile as slow as a dense row). The four index tensors are exactly
FlexAttention's ``BlockMask.from_kv_blocks`` arguments (``kv_num_blocks``/``kv_indices``
for partial tiles, ``full_kv_*`` for full ones); the pure-PyTorch ``gather`` backend and
the tests read the same tensors.

The layout is computed from the pattern's own ``kernel_keep(i, j)`` evaluated chunk by
chunk on the target device (never the whole ``n x n`` mask at once) and cached per
(pattern, length, tile, device): built once per shape, reused by every call.

**Per-call layouts.** A layout that depends on the inputs (LSH buckets, tokens selected by a
score) cannot be cached by shape. :meth:`BlockLayout.from_rule` builds one from a keep rule
computed in the call (:class:`~attnzoo.ops.sparse.patterns.Rule`) by the same compiler, uncached;
:func:`attnzoo.ops.sparse_attention` takes it in place of a pattern and every backend reads it as
it reads a cached one. It costs its compile at every call (a few small kernels and host syncs),
and the Triton backend's plan of it too.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ...errors import check_positive_int
from .patterns import BoundPattern, Pattern, Rule

__all__ = ["BlockLayout", "compile_layout", "DEFAULT_TILE", "clear_cache"]

DEFAULT_TILE = 128  #: FlexAttention's default sparse block; a ±256 window visits 5 tiles, 3 of them full
_CHUNK_ELEMENTS = 1 << 24  # (query rows x keys) evaluated at once while compiling
_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()


@dataclass(eq=False)
class BlockLayout:
    """Which KV tiles each query tile visits (see the module docstring).

    ``partial_count``/``full_count``: int32 ``[num_tiles]``; ``partial_index``/``full_index``:
    int32 ``[num_tiles, num_tiles]``, row ``t`` listing its tiles in ascending order in the first
    ``count[t]`` entries (the rest is padding). ``kept``: kept (query, key) pairs in the kernel part;
    ``kept_total``: in the whole pattern, global rows included.
    """

    pattern: BoundPattern
    n: int
    tile: int
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    full_count: torch.Tensor
    full_index: torch.Tensor
    kept: int
    kept_total: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tiles(self) -> int:
        return self.partial_count.shape[0]

    @property
    def global_rows(self) -> torch.Tensor:
        return self.pattern.global_rows

    @property
    def density(self) -> float:
        """Fraction of the ``n x n`` score matrix the pattern keeps (global rows included)."""
        return self.kept_total / (self.n * self.n)

    @property
    def tiles_visited(self) -> int:
        return int(self.partial_count.sum()) + int(self.full_count.sum())

    @property
    def tiles_full(self) -> int:
        return int(self.full_count.sum())

    @property
    def per_call(self) -> bool:
        """True for a layout built from one call's inputs (:meth:`from_rule`), which nothing caches."""
        return isinstance(self.pattern.pattern, Rule)

    @classmethod
    def from_rule(cls, keep, n: int, tile: int = DEFAULT_TILE, *, causal: bool = False, device=None,
                  label: str = "rule") -> "BlockLayout":
        """The layout of a keep rule computed from this call's inputs, built now and not cached.

        ``keep(i, j)``: broadcastable integer position tensors (values in ``[0, n)``) -> bool, e.g.
        ``lambda i, j: bucket[i] == bucket[j]`` for LSH buckets ``bucket`` (``[n]``) or
        ``lambda i, j: ((i - j).abs() <= w) | chosen[j]`` for a window plus selected tokens. ``causal`` adds
        ``j <= i``. One rule serves every batch row and head. Pass the layout to
        :func:`attnzoo.ops.sparse_attention` as its ``pattern``.
        """
        check_positive_int("n", n)
        check_positive_int("tile", tile)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return _compile(Rule(keep=keep, causal=causal, label=label).bind(n, device), tile)

    def tile_density(self) -> float:
        """Fraction of the score matrix inside visited tiles: what a kernel computes."""
        return self.tiles_visited * self.tile * self.tile / (self.n * self.n)

    def tile_map(self) -> torch.Tensor:
        """Int8 ``[num_tiles, num_tiles]``: 0 not visited, 1 partial, 2 full (for tests and pictures)."""
        t = self.num_tiles
        out = torch.zeros(t, t, dtype=torch.int8, device=self.partial_count.device)
        for count, index, value in ((self.partial_count, self.partial_index, 1), (self.full_count, self.full_index, 2)):
            cols = torch.arange(t, device=count.device)
            sel = cols[None, :] < count[:, None]
            rows = torch.arange(t, device=count.device)[:, None].expand(t, t)
            out[rows[sel], index.long()[sel]] = value
        return out

    def summary(self) -> str:
        return (f"{self.pattern.pattern.describe()} n={self.n} tile={self.tile}: kept {self.density:.2%} of the "
                f"score matrix; {self.tiles_visited} of {self.num_tiles ** 2} tiles visited "
                f"({self.tiles_full} full), {self.global_rows.numel()} global rows computed densely")


def _indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[t, t]`` -> (count int32 [t], ascending indices int32 [t, t], kept tiles first)."""
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count, order


def _compile(bound: BoundPattern, tile: int) -> BlockLayout:
    n, dev = bound.n, bound.device
    t = -(-n // tile)
    span = t * tile
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (tile * span))  # query tiles per chunk
    anyk = torch.zeros(t, t, dtype=torch.bool, device=dev)
    allk = torch.zeros(t, t, dtype=torch.bool, device=dev)
    j = torch.arange(n, device=dev)
    kept = 0
    for t0 in range(0, t, rows_per_chunk):
        t1 = min(t, t0 + rows_per_chunk)
        i = torch.arange(t0 * tile, min(n, t1 * tile), device=dev)
        keep = bound.kernel_keep(i[:, None], j[None, :]).expand(len(i), n)
        kept += int(keep.sum())
        pad = torch.zeros((t1 - t0) * tile, span, dtype=torch.bool, device=dev)
        pad[:len(i), :n] = keep
        valid = torch.zeros_like(pad)
        valid[:len(i), :n] = True
        shape = (t1 - t0, tile, t, tile)
        anyk[t0:t1] = pad.view(shape).any(3).any(1)
        allk[t0:t1] = (pad | ~valid).view(shape).all(3).all(1)
    full = anyk & allk
    partial = anyk & ~allk
    pc, pi = _indices(partial)
    fc, fi = _indices(full)
    g = bound.global_rows.numel()
    if g:  # a global row keeps every key (causal: every earlier one)
        rows = bound.global_rows
        kept_total = kept + int((rows + 1).sum()) if bound.causal else kept + g * n
    else:
        kept_total = kept
    return BlockLayout(bound, n, tile, pc, pi, fc, fi, kept, kept_total)


def compile_layout(pattern: Pattern, n: int, tile: int = DEFAULT_TILE, device=None) -> BlockLayout:
    """The (cached) :class:`BlockLayout` of ``pattern`` at length ``n`` with square tiles of ``tile`` (a
    :class:`~attnzoo.ops.sparse.patterns.Rule`'s is built anew: it belongs to one call)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern={pattern!r}: expected an attnzoo.ops.sparse Pattern (see make_pattern)")
    check_positive_int("tile", tile)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(pattern, Rule):  # computed from one call's inputs: built for it, never cached
        return _compile(pattern.bind(n, device), tile)
    key = (pattern, n, tile, device.type, device.index)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    layout = _compile(pattern.bind(n, device), tile)
    _cache[key] = layout
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return layout


def clear_cache() -> None:
    """Forget every compiled layout (and the FlexAttention block masks built from them)."""
    _cache.clear()
