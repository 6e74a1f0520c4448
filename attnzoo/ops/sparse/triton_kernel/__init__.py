"""attnzoo's block-sparse FlashAttention kernels in Triton (forward and backward).

Two ways to walk the keys, chosen per pattern (:func:`make_plan`, :class:`~.codes.Mode`):

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
atomics). Tile sizes and warps are tuned once per kernel variant (:mod:`.tuning`; the ``autotune`` field of
:class:`~attnzoo.ops.sparse.options.SparseKernelOptions` off: the first configuration that fits, no tuning runs, for
tests and quick runs); launches go through Triton's public ``kernel[grid](...)``.

List mode schedules the work: query tiles run heaviest first (all heads of the longest lists
before any short one), and a KV tile visited by many more query tiles than the others (a global
block: every query reads it) is split over several dK/dV programs, which add their parts into a
float32 scratch; the last of them to finish writes the tile. Rows of global *queries* are part of
the list when they fill whole tiles and the pattern is exact on its tiles (BigBird with tiles =
blocks: :func:`rows_in_kernel`); otherwise, and in band mode, the op overwrites them with a dense
computation (:func:`attnzoo.ops.sparse.backends.fill_global_rows`). The float64 reference for
every path is the dense keep mask through :func:`attnzoo.ops.attention_reference`
(tests/test_sparse_triton.py, under Triton's interpreter on CPU; tests/test_sparse_gpu.py compiled).

Modules: :mod:`.codes` (the integer codes host and kernels share: modes, masks, stages), :mod:`.plan` (what the
kernels read for a layout), :mod:`.kernels` (the ``triton.jit`` code), :mod:`.tuning` (tile configurations and
launches), :mod:`.autograd` (arguments, grids, the autograd function). Importable without Triton: :func:`available`
says why the kernels cannot run.
"""

from .autograd import block_sparse_attention
from .codes import Mask, Mode, Stage
from .kernels import available, interpreted
from .plan import KernelPlan, make_plan, rows_in_kernel

__all__ = ["available", "interpreted", "make_plan", "rows_in_kernel", "KernelPlan", "block_sparse_attention", "Mode",
           "Mask", "Stage"]
