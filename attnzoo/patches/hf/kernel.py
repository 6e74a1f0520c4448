"""attnzoo's fused attention as a ``transformers`` attention implementation named ``"attnzoo"``.

For architectures that keep their own Hugging Face modules (the native ones), ``patch``
swaps the *kernel*, not the module: it registers :func:`hf_attention` in
``transformers.AttentionInterface`` (and SDPA-style boolean masks in
``AttentionMaskInterface``) and calls ``model.set_attn_implementation("attnzoo")``.
The modules, their weights and the saved ``config.json`` stay plain ``transformers``
(the implementation is a run-time choice that ``save_pretrained`` does not write).

Sparse patterns: when ``transformers`` passes ``sliding_window=S`` (mistral, phi3, the sliding
layers of qwen2/qwen3), or the module carries ``attnzoo_pattern`` (set by
``patch(model, "sliding_window", ...)`` on architectures without a native window), the call
runs the pattern on :func:`attnzoo.ops.sparse_attention` (see :mod:`.pattern_call`).
``transformers``' ``S`` keeps ``S`` keys including the query itself (``j > i - S``), so it is
attnzoo's ``window = S - 1``.
"""
from __future__ import annotations

import torch

from ...ops import attention
from ...ops.sparse import Pattern, SlidingWindow
from .pattern_call import plan_pattern_call, run_pattern_call
from .wrapper import hf_mask_to_keep

__all__ = ["KERNEL_NAME", "PATTERN_ATTR", "hf_attention", "register_hf_kernel", "use_attnzoo_kernel",
           "window_of_hf", "hf_sliding_window"]

KERNEL_NAME = "attnzoo"
PATTERN_ATTR = "attnzoo_pattern"  # a module attribute: the pattern the kernel applies to that module


def window_of_hf(sliding_window: int) -> int:
    """attnzoo's ``window`` for ``transformers``' ``sliding_window=S`` (S keys, the query's own included)."""
    return int(sliding_window) - 1


def hf_sliding_window(window: int) -> int:
    """``transformers``' ``sliding_window`` for attnzoo's causal ``window`` (keys ``i - window .. i``)."""
    return int(window) + 1


def _pattern_of(module, sliding_window, causal: bool) -> tuple[Pattern | None, bool]:
    """(pattern, whether HF's mask already holds it). A bidirectional ``sliding_window=S`` (transformers'
    ``create_bidirectional_sliding_window_mask``: ``|i - j| <= S``) is attnzoo's ``window = S``."""
    pattern = getattr(module, PATTERN_ATTR, None)
    if pattern is not None:
        return pattern, False
    if sliding_window is not None:
        window = window_of_hf(sliding_window) if causal else int(sliding_window)
        if window >= 1:
            return SlidingWindow(window=window, causal=causal), True
    return None, False


_registered = False


def hf_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """``transformers`` attention-interface function: ``query [b, hq, q, d]``, ``key``/``value``
    ``[b, hkv, k, d]`` (not repeated) -> ``([b, q, hq, d], None)`` through :func:`attnzoo.ops.attention`."""
    if softcap:
        raise ValueError(f"the attnzoo kernel has no logit soft-capping (softcap={softcap}); patch this model "
                         "with kernel='hf'")
    own = getattr(module, PATTERN_ATTR, None)
    if hasattr(own, "hf_attention"):  # a variant with an attention of its own on HF's q/k/v (reformer's LSH)
        return own.hf_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    k_len = key.shape[2]
    mask, kpm = hf_mask_to_keep(attention_mask, k_len)
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    pattern, mask_has_pattern = _pattern_of(module, kwargs.get("sliding_window"), bool(is_causal))
    # without a 4-d mask the pattern decides causality, so it must agree with the module's
    if pattern is not None and (mask is not None or pattern.causal == bool(is_causal)):
        call = plan_pattern_call(pattern, mask, kpm, query.shape[2], k_len, query.device,
                                 mask_has_pattern=mask_has_pattern)
        out = run_pattern_call(query, key, value, call, scale=scaling, dropout=dropout)
        return out.transpose(1, 2).contiguous(), None
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
