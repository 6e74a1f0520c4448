"""The dense attention op: ``attention(q, k, v, ...)``.

* :mod:`.naive`: the eager reference (plain PyTorch, float64 on CPU is the test oracle);
* :mod:`.call`: the checked arguments of one call, shared by every backend;
* :mod:`.backends`: the fused backends (SDPA kernels, ``flash_attn``, FlexAttention) and the reference as one;
* :mod:`.op`: :func:`attention` with dispatch, forcing, :func:`explain`.

See docs/backends.md.
"""
from ..dispatch import Decision
from .backends import BACKENDS
from .call import AttentionCall
from .naive import attention_reference
from .op import ORDER, attention, backend_names, explain, last_decision, use_backend

__all__ = ["attention", "attention_reference", "explain", "use_backend", "last_decision", "Decision",
           "backend_names", "BACKENDS", "ORDER", "AttentionCall"]
