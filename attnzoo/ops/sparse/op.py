"""``sparse_attention``: attention restricted to a pattern, on the fastest backend that serves the call.

Dispatch follows the dense op's rules (:mod:`attnzoo.ops.dispatch`) with its own backend
names (:data:`SPARSE_ORDER`): the first backend of the device's order that can serve a call
runs it and the choice is remembered per call signature; a forced backend
(``backend=`` or :func:`use_sparse_backend`) that cannot serve raises
:class:`~attnzoo.errors.BackendUnavailableError` with the reason, never falling back;
:func:`explain_sparse` says which backend ran and why the ones ahead did not.
"""
from __future__ import annotations

import threading

import torch

from ..dispatch import Decision, Dispatcher
from .backends import SPARSE_BACKENDS
from .call import SparseCall
from .layout import BlockLayout
from .patterns import Pattern

__all__ = ["sparse_attention", "explain_sparse", "use_sparse_backend", "last_sparse_decision", "SPARSE_ORDER"]

#: Priority per device type; ``"cuda:band"`` for band patterns (``sliding_window``, ``longformer``: see
#: :meth:`Pattern.band`), whose contiguous key runs attnzoo's Triton kernel walks without index tables.
#: Measured on an H200 (benchmarks/results/sparse-h200.md, N=16384, +-256, device time fwd+bwd with the
#: projection): the Triton kernel 0.91 ms, flex over the layout 1.13 ms. Other patterns try flex first, which on
#: CUDA serves 128-tiles only: BigBird's default tile is its block (64), so BigBird runs on the Triton kernel
#: (N=16384: 1.33 ms; flex on 128-tiles 19 ms). ``flash_attn_cute`` (FlashAttention-4's public local attention, if
#: installed) comes after ``triton`` for bands: it serves the band calls the Triton kernels turn down (see
#: :mod:`.flash_attn_cute`). Decoding (q_len < k_len) goes to ``masked``; on the CPU ``gather``.
SPARSE_ORDER: dict[str, tuple[str, ...]] = {
    "cuda:band": ("triton", "flash_attn_cute", "flex", "gather", "masked"),
    "cuda": ("flex", "triton", "gather", "masked"),
    "cpu": ("gather", "masked"),
}
_SPARSE = Dispatcher("sparse_attention", SPARSE_BACKENDS, SPARSE_ORDER, ("gather", "masked"))
_local = threading.local()


def use_sparse_backend(*names: str):
    """Force :func:`sparse_attention` inside the block onto ``names`` (tried in order, no fallback).

    >>> with attnzoo.ops.use_sparse_backend("reference"):
    ...     y = model(x)
    """
    return _SPARSE.use(*names)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | BlockLayout, *,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                     dropout_p: float = 0.0, tile: int | None = None, global_rows: bool = True,
                     kernel_options: dict | None = None, backend: str | tuple[str, ...] | None = None
                     ) -> torch.Tensor:
    """Attention where query ``i`` sees key ``j`` only when ``pattern`` keeps ``(i, j)``.

    Args:
        q: ``[batch, q_heads, q_len, head_dim]``: the *last* ``q_len`` positions of the sequence
            (``q_len == k_len`` for a whole sequence; fewer when decoding with a cache).
        k, v: ``[batch, kv_heads, k_len, head_dim]`` (grouped heads as in :func:`attnzoo.ops.attention`).
        pattern: an :class:`~attnzoo.ops.sparse.Pattern` (its ``causal`` flag included), or a
            :class:`~attnzoo.ops.sparse.BlockLayout` of length ``k_len`` (e.g. one built for this call from the
            inputs: :meth:`~attnzoo.ops.sparse.BlockLayout.from_rule`), which every backend reads as it reads a
            cached one.
        key_padding_mask: bool ``[batch, k_len]``, True = real token.
        scale: softmax scale (default ``1/sqrt(head_dim)``).
        dropout_p: attention dropout (``gather``/``masked``/``reference`` only).
        tile: square tile of the block layout (default: the pattern's ``default_tile()``: 128, FlexAttention's
            block; BigBird: its block size when that is 32, 64 or 128).
        global_rows: False leaves the rows of global tokens at 0, for a caller that computes them
            itself (Longformer's separate global projections).
        kernel_options: FlexAttention ``kernel_options`` (tile sizes, warps, stages) for tuning.
        backend: force one backend name or a priority tuple (see :data:`SPARSE_ORDER`).

    Returns:
        ``[batch, q_heads, q_len, v_dim]`` in the inputs' dtype.
    """
    call = SparseCall.build(q, k, v, pattern, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                            tile=tile, global_rows=global_rows, kernel_options=kernel_options)
    out, decision = _SPARSE.run(call, backend)
    _local.last = decision
    return out


def explain_sparse(q, k, v, pattern, **kwargs) -> Decision:
    """Run ``sparse_attention(q, k, v, pattern, **kwargs)`` without grad; return which backend served it
    and, for every other backend in priority order, why it did not (see :func:`attnzoo.ops.explain`)."""
    backend = kwargs.pop("backend", None)
    call = SparseCall.build(q, k, v, pattern, **kwargs)
    with torch.no_grad():
        return _SPARSE.explain(call, backend)


def last_sparse_decision() -> Decision | None:
    """The :class:`Decision` of the last :func:`sparse_attention` call on this thread."""
    return getattr(_local, "last", None)
