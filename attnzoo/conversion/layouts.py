"""How Hugging Face models store q/k/v, converted to and from :class:`AttnWeights` rows.

* ``separate``: three ``nn.Linear`` (``q_proj``/``k_proj``/``v_proj``, or ``query``/``key``/``value``).
* ``concat``: one fused ``nn.Linear`` whose rows are ``[q (heads*hd); k (kv*hd); v (kv*hd)]``
  (Phi-3's ``qkv_proj``).
* ``interleaved``: one fused ``nn.Linear`` whose rows are, per head, ``[q_h; k_h; v_h]``
  (GPT-NeoX's ``query_key_value``: ``view(heads, 3, head_dim, dim)``).
* ``conv1d``: GPT-2's ``Conv1D`` stores ``weight`` as ``[in, out]`` (transposed) and ``c_attn``
  concatenates ``[q | k | v]`` along ``out``.

All functions are pure: tensors in, tensors out (no copies beyond what the layout needs).
"""
from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "split_concat", "merge_concat", "split_interleaved", "split_conv1d"]

LAYOUTS = ("separate", "concat", "interleaved", "conv1d")


def split_concat(t: torch.Tensor | None, heads: int, kv_heads: int, head_dim: int):
    """Rows ``[q; k; v]`` of a fused weight ``[(heads+2kv)*hd, dim]`` or bias -> ``(q, k, v)``."""
    if t is None:
        return None, None, None
    nq, nkv = heads * head_dim, kv_heads * head_dim
    if t.shape[0] != nq + 2 * nkv:
        raise ValueError(f"fused qkv has {t.shape[0]} rows: expected (heads + 2*kv_heads)*head_dim = "
                         f"({heads} + 2*{kv_heads})*{head_dim}")
    return t[:nq], t[nq:nq + nkv], t[nq + nkv:]


def merge_concat(q, k, v):
    """Inverse of :func:`split_concat` (None stays None)."""
    if q is None:
        return None
    return torch.cat([q, k, v], 0)


def split_interleaved(t: torch.Tensor | None, heads: int, head_dim: int):
    """GPT-NeoX rows ``[h0: q k v, h1: q k v, ...]`` -> ``(q, k, v)`` with heads contiguous."""
    if t is None:
        return None, None, None
    if t.shape[0] != 3 * heads * head_dim:
        raise ValueError(f"query_key_value has {t.shape[0]} rows: expected 3*heads*head_dim = 3*{heads}*{head_dim}")
    per = t.reshape(heads, 3, head_dim, *t.shape[1:])
    return tuple(per[:, i].reshape(heads * head_dim, *t.shape[1:]) for i in range(3))


def split_conv1d(weight: torch.Tensor, bias: torch.Tensor | None, width: int):
    """GPT-2 ``c_attn`` (``weight [dim, 3*width]``) -> ``nn.Linear``-convention ``(q, k, v)`` and biases."""
    w = weight.t()
    if w.shape[0] != 3 * width:
        raise ValueError(f"c_attn has {w.shape[0]} outputs: expected 3*{width}")
    q, k, v = w[:width], w[width:2 * width], w[2 * width:]
    if bias is None:
        return (q, k, v), (None, None, None)
    return (q, k, v), (bias[:width], bias[width:2 * width], bias[2 * width:])
