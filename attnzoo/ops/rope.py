"""Rotary position embeddings, functional.

Two conventions, both used by Hugging Face models:

* ``"half"`` (rotate-half; Llama/Mistral/Qwen/GPT-NeoX in HF): dimension ``i`` pairs with
  ``i + rotary_dim/2``.
* ``"interleaved"`` (GPT-J, original Meta Llama, MLA's decoupled key in DeepSeek's reference):
  dimension ``2i`` pairs with ``2i + 1``.

Partial rotary: only the first ``rotary_dim`` dims of each head are rotated; the rest pass through.
"""
from __future__ import annotations

import torch

__all__ = ["STYLES", "inv_frequencies", "rope_cos_sin", "apply_rope"]

STYLES = ("half", "interleaved")


def inv_frequencies(rotary_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """``[rotary_dim // 2]`` float32 inverse frequencies ``base^(-2i/rotary_dim)``."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, style: str = "half",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[*positions.shape, rotary_dim]`` for integer ``positions``."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    if style == "half":
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = freqs.repeat_interleave(2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    if style == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x``.

    ``x``: ``[batch, heads, seq, head_dim]``; ``cos``/``sin``: ``[seq, rd]`` or ``[batch, seq, rd]``
    (broadcast over heads). Returns a tensor like ``x``.
    """
    rd = cos.shape[-1]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rd == x.shape[-1]:
        return x * cos + _rotate(x, style) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + _rotate(xr, style) * sin, xp), dim=-1)
