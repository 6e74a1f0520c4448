"""The arguments of one latent-attention call (the absorbed MLA core), checked once and shared by the backends."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..autocast import autocast_inputs, check_same_dtype
from ..masks import normalize_key_padding_mask, normalize_mask

__all__ = ["LatentCall"]


@dataclass
class LatentCall:
    """``q_lat [B, H, N, R]``, ``q_rope [B, H, N, Dr]``, ``c [B, S, R]``, ``k_rope [B, S, Rh, Dr]``; masks as
    :mod:`attnzoo.ops.masks` (``key_padding_mask [B, S]``, ``mask`` broadcastable to ``[B, H, N, S]``)."""

    q_lat: torch.Tensor
    q_rope: torch.Tensor
    c: torch.Tensor
    k_rope: torch.Tensor
    scale: float
    causal: bool = False
    mask: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, q_lat, q_rope, c, k_rope, *, scale, causal=False, mask=None, key_padding_mask=None):
        q_lat, q_rope, c, k_rope = autocast_inputs(q_lat, q_rope, c, k_rope)  # as SDPA (attnzoo.ops.autocast)
        for name, t, dims in (("q_lat", q_lat, 4), ("q_rope", q_rope, 4), ("c", c, 3), ("k_rope", k_rope, 4)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
                raise ValueError(f"{name}: expected a floating-point tensor of {dims} dims, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_same_dtype("q_lat, q_rope, c, k_rope", q_lat, q_rope, c, k_rope)
        b, h, n, r = q_lat.shape
        s = c.shape[1]
        if q_rope.shape[:3] != (b, h, n):
            raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_lat {tuple(q_lat.shape)}")
        if c.shape[0] != b or c.shape[2] != r:
            raise ValueError(f"c {tuple(c.shape)}: expected [{b}, seq, {r}] (the latent of q_lat's width)")
        if k_rope.shape[:2] != (b, s) or k_rope.shape[3] != q_rope.shape[3]:
            raise ValueError(f"k_rope {tuple(k_rope.shape)}: expected [{b}, {s}, rope_keys, {q_rope.shape[3]}]")
        if h % k_rope.shape[2]:
            raise ValueError(f"{h} query heads and {k_rope.shape[2]} rope keys: the heads must be a multiple")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ValueError(f"scale={scale!r}: expected a positive float")
        kpm = normalize_key_padding_mask(key_padding_mask, b, s)
        mask = normalize_mask(mask, b, h, n, s)
        return cls(q_lat, q_rope, c, k_rope, float(scale), bool(causal), mask, kpm)

    @property
    def q(self) -> torch.Tensor:  # the dispatcher reads the device here
        return self.q_lat

    @property
    def batch(self) -> int:
        return self.q_lat.shape[0]

    @property
    def heads(self) -> int:
        return self.q_lat.shape[1]

    @property
    def q_len(self) -> int:
        return self.q_lat.shape[2]

    @property
    def k_len(self) -> int:
        return self.c.shape[1]

    @property
    def kv_rank(self) -> int:
        return self.c.shape[2]

    @property
    def rope_dim(self) -> int:
        return self.k_rope.shape[3]

    @property
    def rope_heads(self) -> int:
        return self.k_rope.shape[2]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q_lat, self.q_rope, self.c, self.k_rope))

    def signature(self) -> tuple:
        return (self.q_lat.device.type, self.q_lat.device.index, self.q_lat.dtype, self.heads, self.rope_heads,
                self.kv_rank, self.rope_dim, self.q_len == 1, self.causal, self.mask is not None,
                self.key_padding_mask is not None, self.needs_grad)
