"""The integer codes the host passes to the kernels as ``tl.constexpr`` (one name for each, on both sides).

Plain ints in namespaces (importable without Triton); :mod:`.kernels` turns each into a ``tl.constexpr`` global.
"""
from __future__ import annotations

__all__ = ["Mode", "Mask", "Stage", "ITEM_FIELDS", "REDO_CHUNK"]


class Mode:
    """How a kernel walks the keys (``MODE``)."""

    BAND = 0  #: one contiguous run of keys per block of queries, ``lo <= j - i <= hi`` (no index tables)
    LIST = 1  #: the layout's lists of KV tiles per query tile (and their transposes for dK/dV)


class Mask:
    """What a block evaluates to know which pairs it keeps (``MASK``; ``FMASK`` for full tiles, ``PMASK`` for
    partial ones)."""

    NONE = 0  #: nothing: every pair is kept and in bounds (full tiles, the band's middle stage)
    BAND = 1  #: the band ``lo <= j - i <= hi`` (the band's two edge stages)
    CAUSAL = 2  #: ``j <= i`` (partial tiles of a tile-exact causal pattern: the diagonal tiles)
    BITS = 3  #: the bit-packed pattern mask of the partial tile (patterns not exact on their tiles)
    OUTSIDE_BAND = 4  #: global key columns outside the band (the keys' positions are gathered)
    BOUNDS = 5  #: only the sequence's end (full tiles of a length that is no multiple of the tile; tile-exact
    #: bidirectional partial tiles)


class Stage:
    """The forward's softmax reference (``STAGE``)."""

    RUNNING_MAX = 0  #: the online softmax with a running row max
    FIXED = 1  #: each row's self-score as a fixed reference; a block whose exponent overflowed sets its flag
    REDO = 2  #: after FIXED: redo the flagged blocks with the running max (a second, small launch)


#: Fields of one dK/dV work item in list mode: KV tile, first and last slot of its query-tile list, split id (-1:
#: the whole tile), parts of that tile.
ITEM_FIELDS = 5
#: Query blocks per program of the forward's redo launch (``Stage.REDO``).
REDO_CHUNK = 32
