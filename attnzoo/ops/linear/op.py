"""``linear_attention``: the op's entry point (see :mod:`.naive` for its definition).

Causal attention on a CUDA device runs the fused Triton kernels (:mod:`.triton_kernel`: the chunks' states and
outputs on tensor cores, the denominator in the same products as a ones column of ``v``; with a softmax window
the whole hybrid, window and linear part and their one normaliser, in the same kernels); everything else, and
the CPU, runs :mod:`.chunked`. ``backend="torch"`` forces the PyTorch form, ``"triton"`` the kernels.
"""
from __future__ import annotations

import torch

from ...errors import check_choice
from .chunked import LinearState, linear_attention_chunked

__all__ = ["linear_attention", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def _causal_fn(backend: str, device: torch.device):
    if backend == "torch":
        return None
    from . import triton_kernel

    if backend == "auto" and not (device.type == "cuda" and triton_kernel.available() is None):
        return None
    why = triton_kernel.available()
    if why is not None:
        raise ValueError(f"backend='triton': {why}; use backend='torch'")
    return triton_kernel.causal_parts_fused


def _window_fn(backend: str, qf, v, q, window: int, initial_state, tensors):
    """The fused window hybrid where it applies (else None: the window part in PyTorch, the linear part on
    :func:`_causal_fn`'s kernels)."""
    if backend == "torch" or not window or q is None:
        return None
    from . import triton_kernel

    if triton_kernel.available() is not None or (backend == "auto" and qf.device.type != "cuda"):
        return None
    why = triton_kernel.window_fits(qf, v, q, window)
    if why is not None and backend == "triton" and window > triton_kernel.MAX_WINDOW:
        raise ValueError(f"backend='triton': {why}; use backend='auto' (the window part in PyTorch) or 'torch'")
    if why is not None:
        return None
    if initial_state is not None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*tensors, *initial_state)):
        return None  # with an initial state the fused window runs forward only (decoding, prefill with a cache)
    return triton_kernel.window_fused


def linear_attention(qf, kf, v, *, causal: bool = False, key_padding_mask=None, q_log=None, k_log=None,
                     window: int = 0, q=None, k=None, scale: float | None = None,
                     initial_state: LinearState | None = None, return_state: bool = False, chunk: int = 64,
                     backend: str = "auto"):
    """Linear attention with feature rows ``qf [b, hq, n, f]``, ``kf [b, hkv, n, f]`` (times ``exp(q_log)``,
    ``exp(k_log)``), values ``v [b, hkv, n, dv]``; causal or not; ``window``: exact softmax over the last
    ``window`` keys (needs ``q``, ``k``); ``key_padding_mask [b, n]`` True = keep. Grouped KV heads are read in
    place (the state is per KV head). Returns ``[b, hq, n, dv]`` (and the final :class:`LinearState` with
    ``return_state``)."""
    check_choice("backend", backend, BACKENDS)
    fn = _causal_fn(backend, qf.device) if causal else None
    wfn = _window_fn(backend, qf, v, q, window, initial_state, (qf, kf, v, q, k, q_log, k_log)) if causal and fn is not None else None
    return linear_attention_chunked(qf, kf, v, causal=causal, valid=key_padding_mask, q_log=q_log, k_log=k_log,
                                    window=window, q=q, k=k, scale=scale, initial_state=initial_state,
                                    return_state=return_state, chunk=chunk, causal_fn=fn, window_fn=wfn)
