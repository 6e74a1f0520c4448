"""FlexAttention, shared by the dense and the sparse op: the compiled function and what it cannot serve.

On CUDA ``flex_attention`` runs compiled (``torch.compile``; one compiled function per mode, e.g. Inductor's
``"max-autotune-no-cudagraphs"`` for the sparse op's tuning runs); elsewhere the eager (unfused) path, which has no
backward. attnzoo leaves Dynamo's settings as the process has them: the compiled function is specialised to the first
length it sees and, when a second comes, recompiled once with a symbolic length (PyTorch's automatic dynamic shapes),
so a model that sees many lengths stays within ``torch._dynamo.config.recompile_limit``. A process that wants one
static kernel per length raises that limit itself and compiles its own function.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["flex_function", "flex_reason"]

_compiled: dict[str | None, Callable] = {}


def flex_function(device_type: str, mode: str | None = None) -> Callable:
    """``flex_attention`` compiled with ``torch.compile(mode=mode)`` on CUDA (built once per mode); the eager
    function elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    fn = _compiled.get(mode)
    if fn is None:
        import torch

        fn = _compiled[mode] = torch.compile(flex_attention, mode=mode)
    return fn


def flex_reason(q, k, v, dropout_p: float, head_dim: int) -> str | None:
    """Why FlexAttention cannot serve these inputs, or None (shared by the dense and sparse ops)."""
    if dropout_p > 0:
        return "FlexAttention has no dropout"
    if q.device.type != "cuda" and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward off CUDA (pass inputs that do not require grad)"
    if q.device.type == "cuda" and head_dim < 16:
        return f"compiled FlexAttention needs head_dim >= 16, got {head_dim}"
    return None
