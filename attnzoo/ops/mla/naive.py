"""MLA attention in plain PyTorch: the expanded and the absorbed forms, the float64 oracle of the fused paths.

Shapes (one layer): ``H`` query heads, ``Rh`` rope keys per token (1: DeepSeek's shared key; the KV heads with
``rope_keys="per_head"``), latent ``c [B, S, R]`` (after ``kv_a_layernorm``), rope keys ``k_rope [B, S, Rh, Dr]``
(after RoPE), queries ``q_nope [B, H, N, Dn]`` and ``q_rope [B, H, N, Dr]`` (after RoPE), and the two halves of
``kv_b_proj`` per head: ``w_kb [H, Dn, R]`` (keys) and ``w_vb [H, Dv, R]`` (values). Query head ``h`` reads rope
key ``h // (H // Rh)``.

* **expanded** (prefill, training): ``k = [c w_kbᵀ ; k_rope]``, ``v = c w_vbᵀ`` per head, then dense attention
  with q/k head dim ``Dn + Dr`` and v head dim ``Dv``;
* **absorbed** (decode): ``q_lat = q_nope w_kb`` (``[B, H, N, R]``), attention of ``[q_lat; q_rope]`` over
  ``[c; k_rope]`` (q/k head dim ``R + Dr``, values ``c``, head dim ``R``), then ``o = o_lat w_vbᵀ``. Same scores,
  same output: ``q_nope · (w_kb c) = (q_nope w_kb) · c``; the cache is never expanded.
"""
from __future__ import annotations

import torch

from ..dense.naive import attention_reference

__all__ = ["expand_kv", "absorb_query", "absorbed_output", "absorbed_keys", "mla_expanded_reference",
           "mla_absorbed_reference", "latent_attention_reference"]


def expand_kv(c: torch.Tensor, k_rope: torch.Tensor, w_kb: torch.Tensor, w_vb: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full keys ``[B, H, S, Dn + Dr]`` and values ``[B, H, S, Dv]`` from the latent and the rope keys."""
    heads, rh = w_kb.shape[0], k_rope.shape[2]
    k_nope = torch.einsum("bsr,hdr->bhsd", c, w_kb)
    v = torch.einsum("bsr,hdr->bhsd", c, w_vb)
    kr = k_rope.transpose(1, 2).repeat_interleave(heads // rh, dim=1)  # [B, H, S, Dr]
    return torch.cat([k_nope, kr], dim=-1), v


def absorb_query(q_nope: torch.Tensor, w_kb: torch.Tensor) -> torch.Tensor:
    """``q_nope [B, H, N, Dn]`` folded through ``w_kb [H, Dn, R]`` into the latent space: ``[B, H, N, R]``."""
    return torch.einsum("bhnd,hdr->bhnr", q_nope, w_kb)


def absorbed_output(o_lat: torch.Tensor, w_vb: torch.Tensor) -> torch.Tensor:
    """``o_lat [B, H, N, R]`` through ``w_vb [H, Dv, R]``: the heads' outputs ``[B, H, N, Dv]``."""
    return torch.einsum("bhnr,hdr->bhnd", o_lat, w_vb)


def absorbed_keys(c: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """``[c; k_rope]`` as ``Rh`` KV heads ``[B, Rh, S, R + Dr]`` (a copy: the reference and the dense fallback)."""
    rh = k_rope.shape[2]
    return torch.cat([c.unsqueeze(1).expand(-1, rh, -1, -1), k_rope.transpose(1, 2)], dim=-1)


def latent_attention_reference(q_lat, q_rope, c, k_rope, *, scale: float, causal: bool = False, mask=None,
                               key_padding_mask=None, compute_dtype=None) -> torch.Tensor:
    """The absorbed core: softmax(([q_lat; q_rope] · [c; k_rope]) · scale) c -> ``o_lat [B, H, N, R]``."""
    q = torch.cat([q_lat, q_rope], dim=-1)
    return attention_reference(q, absorbed_keys(c, k_rope), c.unsqueeze(1).expand(-1, k_rope.shape[2], -1, -1),
                               causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                               compute_dtype=compute_dtype)


def mla_expanded_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, *, scale: float, causal: bool = False, mask=None,
                           key_padding_mask=None, compute_dtype=None) -> torch.Tensor:
    """Heads' outputs ``[B, H, N, Dv]`` through the expanded keys and values."""
    k, v = expand_kv(c, k_rope, w_kb, w_vb)
    q = torch.cat([q_nope, q_rope], dim=-1)
    return attention_reference(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                               compute_dtype=compute_dtype)


def mla_absorbed_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, *, scale: float, causal: bool = False, mask=None,
                           key_padding_mask=None, compute_dtype=None) -> torch.Tensor:
    """Heads' outputs ``[B, H, N, Dv]`` through the absorbed form (equal to :func:`mla_expanded_reference`)."""
    o_lat = latent_attention_reference(absorb_query(q_nope, w_kb), q_rope, c, k_rope, scale=scale, causal=causal,
                                       mask=mask, key_padding_mask=key_padding_mask, compute_dtype=compute_dtype)
    return absorbed_output(o_lat, w_vb)
