"""How the sparse op's kernels run: one frozen options object, set per process or for a block.

>>> from attnzoo.ops.sparse import SparseKernelOptions, use_sparse_kernel_options, set_sparse_kernel_options
>>> with use_sparse_kernel_options(autotune=False):      # this block (and this thread / task) only
...     y = sparse_attention(q, k, v, pattern)
>>> set_sparse_kernel_options(fixed_reference=False)     # the process default from now on; returns the old one

There are no environment variables and no module-level switches: every choice that changes how the kernels run
is a field here, read once per call. The defaults are the measured fast path.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

from ...errors import check_positive_int, check_type

__all__ = ["SparseKernelOptions", "sparse_kernel_options", "set_sparse_kernel_options", "use_sparse_kernel_options"]


@dataclass(frozen=True)
class SparseKernelOptions:
    """Options of the sparse op's kernel backends (``triton`` and ``flex``).

    Attributes:
        autotune: time the Triton kernels' tile configurations once per kernel variant (head_dim, mode, dtype, ...)
            and keep the fastest; False: the first configuration that fits (no tuning runs; tests, quick scripts).
        fixed_reference: the band forward may take each row's self-score as its fixed softmax reference instead of
            a running max (a second small launch redoes the blocks whose exponent overflowed; same results either
            way); where the band is at least ``fixed_min_width`` keys wide and has at least ``fixed_min_rows`` query
            rows (batch x heads x length), where it was measured to pay (docs/sparse.md).
        split_min, split_factor: list mode splits a KV tile whose list of query tiles is longer than
            ``max(split_min, split_factor x the mean list)`` over several dK/dV programs (global blocks).
        flex_compile_mode: ``torch.compile``'s ``mode`` for the ``flex`` backend on CUDA (None: the default compile
            shared with the dense op; ``"max-autotune-no-cudagraphs"`` lets Inductor time FlexAttention's
            configurations per shape, minutes of compiling).
    """

    autotune: bool = True
    fixed_reference: bool = True
    fixed_min_width: int = 448
    fixed_min_rows: int = 1 << 17
    split_min: int = 8
    split_factor: int = 2
    flex_compile_mode: str | None = None

    def __post_init__(self):
        check_type("autotune", self.autotune, bool, "True or False")
        check_type("fixed_reference", self.fixed_reference, bool, "True or False")
        for name in ("fixed_min_width", "fixed_min_rows", "split_min", "split_factor"):
            check_positive_int(name, getattr(self, name), minimum=0)
        if self.flex_compile_mode is not None:
            check_type("flex_compile_mode", self.flex_compile_mode, str, "a torch.compile mode name or None")


_process = [SparseKernelOptions()]  # the process default (set_sparse_kernel_options)
_scoped: contextvars.ContextVar[SparseKernelOptions | None] = contextvars.ContextVar(
    "attnzoo_sparse_kernel_options", default=None)


def sparse_kernel_options() -> SparseKernelOptions:
    """The options in force here: the innermost :func:`use_sparse_kernel_options` block, else the process
    default."""
    scoped = _scoped.get()
    return _process[0] if scoped is None else scoped


def _make(options: SparseKernelOptions | None, changes: dict) -> SparseKernelOptions:
    if options is not None and not isinstance(options, SparseKernelOptions):
        raise TypeError(f"options={options!r}: expected a SparseKernelOptions or None")
    base = options if options is not None else sparse_kernel_options()
    fields = {f.name for f in dataclasses.fields(SparseKernelOptions)}
    for key in changes:
        if key not in fields:
            from ...errors import suggest

            raise ValueError(f"unknown sparse kernel option {key!r}.{suggest(key, sorted(fields))} "
                             f"Valid options: {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **changes)


def set_sparse_kernel_options(options: SparseKernelOptions | None = None, **changes) -> SparseKernelOptions:
    """Set the process default to ``options`` (or the current options with ``changes``); returns the previous
    default, so ``set_sparse_kernel_options(previous)`` restores it."""
    previous = _process[0]
    _process[0] = _make(options, changes)
    return previous


@contextlib.contextmanager
def use_sparse_kernel_options(options: SparseKernelOptions | None = None, **changes):
    """Run the block with ``options`` (or the current options with ``changes``); yields them."""
    token = _scoped.set(_make(options, changes))
    try:
        yield _scoped.get()
    finally:
        _scoped.reset(token)
