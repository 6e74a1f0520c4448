"""Sparse attention: patterns -> block layouts -> block-sparse fused kernels.

* :mod:`.patterns`: what each query may attend to (the window convention is documented there);
* :mod:`.layout`: the compiler from a pattern at one length to visited tiles (full / partial), cached; and
  per-call layouts of rules computed from the inputs (:meth:`BlockLayout.from_rule`);
* :mod:`.naive`: the reference (the pattern's keep mask through the dense reference; the float64 oracle);
* :mod:`.gather`: pure PyTorch over the layout; :mod:`.flex`: FlexAttention over the layout;
  :mod:`.triton_kernel`: attnzoo's Triton kernels over the layout;
* :mod:`.call`, :mod:`.backends`: the checked arguments of a call and the backends that serve it;
* :mod:`.op`: :func:`sparse_attention` with dispatch, forcing and ``explain_sparse``;
* :mod:`.options`: :class:`SparseKernelOptions`, how the kernel backends run (one object, no environment switches).

See docs/sparse.md.
"""
from .backends import SPARSE_BACKENDS
from .layout import DEFAULT_TILE, BlockLayout, compile_layout
from .naive import sparse_attention_reference
from .options import (SparseKernelOptions, set_sparse_kernel_options, sparse_kernel_options,
                      use_sparse_kernel_options)
from .op import SPARSE_ORDER, explain_sparse, last_sparse_decision, sparse_attention, use_sparse_backend
from .patterns import (PATTERNS, BigBird, BoundPattern, Dense, Fixed, Longformer, Pattern, Rule, SlidingWindow,
                       Strided, make_pattern)

__all__ = ["sparse_attention", "sparse_attention_reference", "explain_sparse", "use_sparse_backend",
           "last_sparse_decision", "SPARSE_ORDER", "SPARSE_BACKENDS",
           "SparseKernelOptions", "sparse_kernel_options", "set_sparse_kernel_options", "use_sparse_kernel_options", "compile_layout", "BlockLayout", "DEFAULT_TILE", "Pattern", "BoundPattern", "Dense",
           "SlidingWindow", "Longformer", "BigBird", "Strided", "Fixed", "Rule", "PATTERNS", "make_pattern"]
