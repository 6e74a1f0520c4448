"""Band patterns through FlashAttention-4's public API (the ``flash_attn_cute`` sparse backend).

``sliding_window`` (and ``longformer`` without global tokens) is FlashAttention's *local* attention: query ``i``
keeps key ``j`` when ``i - left <= j <= i + right``. ``flash_attn.cute.flash_attn_func(q, k, v, softmax_scale=...,
window_size=(left, right))`` (the ``flash-attn-4`` package: ``pip install 'attnzoo[fa4]'``) runs its own forward
and backward for it; attnzoo calls that public function and nothing behind it.

Measured on an H200 (flash-attn-4 4.0.0b36, N=16384, ±256, 12 heads, head_dim 64, bf16; kernels given dO, CUDA
graphs): its forward and backward take 0.338 ms, attnzoo's own Triton kernels 0.383 ms; its Python wrapper adds
host time on every call. The ``triton`` backend stays first in the band order (measured, tested on every band
call, its host time known); this one serves the band calls it turns down (e.g. head_dim not a power of two) and a
forced ``backend="flash_attn_cute"``. Its backward adds dQ with float32 atomics (not bit-reproducible), so it
declines under ``torch.use_deterministic_algorithms``.
"""
from __future__ import annotations

import importlib.util

import torch

__all__ = ["band_reason", "flash_attn_cute_band"]

_HALF = (torch.float16, torch.bfloat16)


def band_reason(call) -> str | None:
    """Why ``flash_attn.cute`` cannot take this sparse call (None: it can)."""
    band = call.pattern.band()
    if band is None:
        return f"{call.pattern.name} is not a band (FlashAttention's local attention takes only a window)"
    lo, hi = band
    if lo > 0 or hi < 0:
        return f"the band {lo}..{hi} does not hold the diagonal"
    if call.layout.global_rows.numel():
        return "global tokens (FlashAttention's local attention has no global columns)"
    d = call.dense
    if d.key_padding_mask is not None:
        return "key padding (this path passes none to flash_attn.cute)"
    if d.dropout_p > 0:
        return "dropout (this path passes none to flash_attn.cute)"
    if call.q.dtype not in _HALF:
        return f"takes float16/bfloat16, inputs are {call.q.dtype}"
    if d.head_dim % 8 or d.head_dim > 256 or d.v_dim != d.head_dim:
        return f"takes head_dim = v_dim, a multiple of 8 up to 256; got {d.head_dim} and {d.v_dim}"
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms is on (its backward adds dQ with float32 atomics)"
    if call.q.device.type != "cuda":
        return f"needs CUDA inputs, they are on {call.q.device.type}"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "package 'flash_attn.cute' is not installed (pip install 'attnzoo[fa4]')"
    return None


def flash_attn_cute_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
                         scale: float | None = None) -> torch.Tensor:
    """``[B, Hq, N, D]`` attention over the band ``lo <= j - i <= hi`` (``lo <= 0 <= hi``) through
    ``flash_attn.cute.flash_attn_func``; q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` (read as ``[B, N, H, D]``
    views, no copies)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=False, window_size=(-lo, hi))
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)
