"""``linear_attention``: the op's entry point (see :mod:`.naive` for its definition).

Causal attention on a CUDA device runs the fused Triton kernels (:mod:`.triton_kernel`: the chunks' states and
outputs on tensor cores, the denominator in the same products as a ones column of ``v``); everything else, and
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
    return linear_attention_chunked(qf, kf, v, causal=causal, valid=key_padding_mask, q_log=q_log, k_log=k_log,
                                    window=window, q=q, k=k, scale=scale, initial_state=initial_state,
                                    return_state=return_state, chunk=chunk, causal_fn=fn)
