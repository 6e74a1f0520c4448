"""Mask conventions, in one place.

Every attnzoo op and module uses these conventions:

* Layout: ``q`` is ``[batch, q_heads, q_len, head_dim]``; ``k`` and ``v`` are
  ``[batch, kv_heads, k_len, head_dim]`` (``v`` may have its own last dim).
  ``q_heads`` must be a multiple of ``kv_heads`` (grouped-query attention);
  query head ``h`` reads KV head ``h // (q_heads // kv_heads)``.
* ``key_padding_mask``: bool ``[batch, k_len]``, **True = a real token to keep**,
  False = padding. (HF's ``attention_mask`` of ones and zeros converts with ``.bool()``.)
* ``mask``: bool, broadcastable to ``[batch, q_heads, q_len, k_len]``,
  **True = this query may attend to this key**.
* ``causal=True``: query ``i`` may attend to key ``j`` iff ``j <= i + (k_len - q_len)``,
  i.e. the causal diagonal is aligned to the *bottom right*. With ``q_len == k_len``
  this is the usual lower triangle; with a KV cache (``k_len > q_len``) the new
  queries see the whole past. (PyTorch's ``is_causal`` aligns top-left; attnzoo
  translates.)
* All three combine by logical AND. A query row with no key left to attend to
  outputs zeros (and passes zero gradient), in every backend.
"""
from __future__ import annotations

import torch

__all__ = ["causal_keep", "combine_masks", "normalize_key_padding_mask", "normalize_mask"]


def causal_keep(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bool ``[q_len, k_len]``: bottom-right-aligned causal keep mask."""
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(k_len, device=device).unsqueeze(0)
    return j <= i + (k_len - q_len)


def normalize_key_padding_mask(kpm, batch: int, k_len: int) -> torch.Tensor | None:
    """Check a key-padding mask and return it as bool ``[batch, k_len]`` (or None)."""
    if kpm is None:
        return None
    if not isinstance(kpm, torch.Tensor):
        raise TypeError(f"key_padding_mask={type(kpm).__name__}: expected a bool tensor [batch, k_len] or None")
    if kpm.dtype != torch.bool:
        if kpm.is_floating_point():
            raise TypeError(f"key_padding_mask has dtype {kpm.dtype}: expected bool (True = keep) or 0/1 integers; "
                            "additive float masks are not accepted, convert with (mask == 0)")
        kpm = kpm != 0
    if kpm.shape != (batch, k_len):
        raise ValueError(f"key_padding_mask has shape {tuple(kpm.shape)}: expected [batch, k_len] = [{batch}, {k_len}]")
    return kpm


def normalize_mask(mask, batch: int, heads: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """Check a keep mask and return it as a 4-d bool tensor broadcastable to ``[B, H, Nq, Nk]``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask={type(mask).__name__}: expected a bool tensor or None")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask has dtype {mask.dtype}: expected bool (True = may attend)")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    target = (batch, heads, q_len, k_len)
    if mask.dim() != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target)):
        raise ValueError(f"mask has shape {tuple(mask.shape)}: expected a shape broadcastable to "
                         f"[batch, q_heads, q_len, k_len] = {list(target)}")
    return mask


def combine_masks(q_len: int, k_len: int, *, causal: bool = False, mask=None, key_padding_mask=None,
                  device=None) -> torch.Tensor | None:
    """AND of causal, ``mask`` and ``key_padding_mask`` as one bool keep mask
    broadcastable to ``[B, H, Nq, Nk]``; None when nothing is masked."""
    out = None
    if causal:
        out = causal_keep(q_len, k_len, device=device)[None, None]
    if mask is not None:
        out = mask if out is None else out & mask
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        out = kp if out is None else out & kp
    return out
