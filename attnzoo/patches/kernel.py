"""attnzoo's fused attention as a ``transformers`` attention implementation named ``"attnzoo"``.

For architectures that keep their own Hugging Face modules (the native ones), ``patch``
swaps the *kernel*, not the module: it registers :func:`hf_attention` in
``transformers.AttentionInterface`` (and SDPA-style boolean masks in
``AttentionMaskInterface``) and calls ``model.set_attn_implementation("attnzoo")``.
The modules, their weights and the saved ``config.json`` stay plain ``transformers``
(the implementation is a run-time choice that ``save_pretrained`` does not write).
"""
from __future__ import annotations

import torch

from ..ops import attention
from .wrapper import hf_mask_to_keep

__all__ = ["KERNEL_NAME", "hf_attention", "register_hf_kernel", "use_attnzoo_kernel"]

KERNEL_NAME = "attnzoo"
_registered = False


def hf_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """``transformers`` attention-interface function: ``query [b, hq, q, d]``, ``key``/``value``
    ``[b, hkv, k, d]`` (not repeated) -> ``([b, q, hq, d], None)`` through :func:`attnzoo.ops.attention`."""
    if softcap:
        raise ValueError(f"the attnzoo kernel has no logit soft-capping (softcap={softcap}); patch this model "
                         "with kernel='hf'")
    k_len = key.shape[2]
    mask, kpm = hf_mask_to_keep(attention_mask, k_len)
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    causal = bool(is_causal) and mask is None and query.shape[2] > 1  # a 4-d mask already holds it
    out = attention(query, key, value, causal=causal, mask=mask, key_padding_mask=kpm, scale=scaling,
                    dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register_hf_kernel() -> None:
    """Register ``"attnzoo"`` with ``transformers`` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KERNEL_NAME, hf_attention)
    AttentionMaskInterface.register(KERNEL_NAME, sdpa_mask)
    _registered = True


def use_attnzoo_kernel(model) -> None:
    register_hf_kernel()
    model.set_attn_implementation(KERNEL_NAME)
