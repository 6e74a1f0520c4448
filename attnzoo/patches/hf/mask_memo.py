"""Read a Hugging Face mask once per forward, not once per layer.

``transformers`` builds one attention mask per forward and hands the same tensor to every layer.
Turning it into attnzoo's masks and checking what it holds (:func:`.wrapper.hf_mask_to_keep`,
:func:`.pattern_call.plan_pattern_call`) reads values on the host (``bool(t.all())``), and on a GPU
each read waits for everything queued before it. Done per layer, that drains the launch queue L
times per step, which decoding (one token, short kernels) feels most.

:func:`memoized` keeps such a result for as long as its mask tensors are alive and unchanged: the
same objects (checked through weak references, so a reused ``id`` never matches) at the same
in-place version (``Tensor._version``, bumped by every in-place write). Only the first layer pays;
a new mask (the next forward or decoding step) is read again. Nothing is kept past the mask: an
entry goes when its first tensor is freed. Under ``torch.compile`` tracing nothing is memoized.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch

__all__ = ["memoized", "clear"]

_ENTRIES: dict[int, tuple[weakref.ref, dict]] = {}  # id(first tensor) -> (its weak reference, {key: result})
_PER_TENSOR = 16  # results kept per mask (keys differ by length and pattern; a forward needs one or two)


def _forget(ref: weakref.ref, anchor_id: int) -> None:
    entry = _ENTRIES.get(anchor_id)
    if entry is not None and entry[0] is ref:
        del _ENTRIES[anchor_id]


def memoized(tensors: Sequence[torch.Tensor | None], key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its earlier result for the same ``key`` and the same, unchanged ``tensors``
    (``None`` entries allowed; with no tensor at all, ``compute()`` runs every time). ``key`` must be
    hashable and hold everything else the result depends on. An exception is not remembered."""
    live = [t for t in tensors if t is not None]
    if not live or torch.compiler.is_compiling():
        return compute()
    try:
        hash(key)
    except TypeError:
        return compute()
    anchor = live[0]
    entry = _ENTRIES.get(id(anchor))
    if entry is None or entry[0]() is not anchor:
        ref = weakref.ref(anchor, lambda r, i=id(anchor): _forget(r, i))
        entry = _ENTRIES[id(anchor)] = (ref, {})
    table = entry[1]
    versions = tuple(None if t is None else t._version for t in tensors)
    hit = table.get(key)
    if hit is not None:
        refs, seen, result = hit
        same = all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))
        if same and seen == versions:
            return result
    result = compute()
    if len(table) >= _PER_TENSOR:
        table.clear()
    table[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors), versions, result)
    return result


def clear() -> None:
    """Forget every memoized result."""
    _ENTRIES.clear()
