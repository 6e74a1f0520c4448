"""``attention``: dense attention on the fastest backend that serves the call, and which one ran.

The order below is the ranking measured by ``attnzoo bench`` on an H200
(benchmarks/results/): the first backend that can serve a call runs it. The
choice is remembered per call signature (device, dtype, heads, head_dim, masks,
causal, ...; not the lengths), so the probing cost is paid once.

Forcing: ``with attnzoo.ops.use_backend("eager"): ...`` or ``attention(..., backend="sdpa_cudnn")``.
A forced backend that cannot serve raises :class:`~attnzoo.errors.BackendUnavailableError`
with the reason; it never silently falls back. Several names form a priority list.
"""
from __future__ import annotations

import threading

import torch

from ..dispatch import Decision, Dispatcher
from .backends import BACKENDS
from .call import AttentionCall

__all__ = ["attention", "explain", "use_backend", "last_decision", "backend_names", "ORDER"]

#: Priority per device type (fastest first).
ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("sdpa_cudnn", "flash_attn_cute", "sdpa_flash", "flash_attn", "sdpa_efficient", "flex", "sdpa_math",
             "eager"),
    "cpu": ("sdpa_flash", "sdpa_math", "eager"),
}
_DEFAULT_ORDER = ("sdpa_math", "eager")

_DENSE = Dispatcher("attention", BACKENDS, ORDER, _DEFAULT_ORDER)
_local = threading.local()


def backend_names() -> list[str]:
    """All backend names, fastest first on CUDA."""
    return list(BACKENDS)


def use_backend(*names: str):
    """Force dense attention inside the block onto ``names`` (tried in order; none may fall back).

    >>> with attnzoo.ops.use_backend("eager"):
    ...     y = model(x)
    """
    return _DENSE.use(*names)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, dropout_p: float = 0.0, backend: str | tuple[str, ...] | None = None
              ) -> torch.Tensor:
    """Dense scaled dot-product attention on the fastest backend that can serve the call.

    Args:
        q: ``[batch, q_heads, q_len, head_dim]``.
        k: ``[batch, kv_heads, k_len, head_dim]``; ``q_heads % kv_heads == 0`` (grouped
            heads are read in place, never repeated in memory by the fused backends).
        v: ``[batch, kv_heads, k_len, v_dim]``.
        causal: bottom-right-aligned causal mask (see :mod:`attnzoo.ops.masks`).
        mask: bool keep mask broadcastable to ``[batch, q_heads, q_len, k_len]``.
        key_padding_mask: bool ``[batch, k_len]``, True for real tokens.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        dropout_p: attention-probability dropout (pass 0 in eval).
        backend: force one backend name (or a priority tuple); see :func:`backend_names`.

    Returns:
        ``[batch, q_heads, q_len, v_dim]`` in the inputs' dtype.
    """
    call = AttentionCall.build(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                               dropout_p=dropout_p)
    out, decision = _DENSE.run(call, backend)
    _local.last = decision
    return out


def explain(q, k, v, **kwargs) -> Decision:
    """Run ``attention(q, k, v, **kwargs)`` without grad and return the :class:`Decision`: which
    backend served it, and every other backend in priority order with the reason it did not
    (``print`` it for a readable list). The order is probed afresh, not taken from the memo."""
    call = AttentionCall.build(q, k, v, **{k_: v_ for k_, v_ in kwargs.items() if k_ != "backend"})
    with torch.no_grad():
        return _DENSE.explain(call, kwargs.get("backend"))


def last_decision() -> Decision | None:
    """The :class:`Decision` of the last :func:`attention` call on this thread."""
    return getattr(_local, "last", None)
