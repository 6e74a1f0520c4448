"""The arguments of one dense attention call, checked once and shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..autocast import autocast_inputs, check_same_dtype
from ..masks import combine_masks, normalize_key_padding_mask, normalize_mask

__all__ = ["AttentionCall"]


@dataclass
class AttentionCall:
    """Checked arguments (see :mod:`attnzoo.ops.masks` for shapes and conventions)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool = False
    mask: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    scale: float | None = None
    dropout_p: float = 0.0

    @classmethod
    def build(cls, q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0):
        """Check the arguments; under ``torch.autocast`` q, k, v are first cast to its dtype
        (:mod:`attnzoo.ops.autocast`)."""
        q, k, v = autocast_inputs(q, k, v)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}={type(t).__name__}: expected a tensor [batch, heads, seq, head_dim]")
            if t.dim() != 4:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected 4 dims [batch, heads, seq, head_dim]")
            if not t.is_floating_point():
                raise TypeError(f"{name} has dtype {t.dtype}: expected a floating-point tensor")
        check_same_dtype("q, k, v", q, k, v)
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
        b, hq, nq, d = q.shape
        if k.shape[0] != b or v.shape[0] != b:
            raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape[-1] != d:
            raise ValueError(f"k head_dim={k.shape[-1]} differs from q head_dim={d}")
        if k.shape[1:3] != v.shape[1:3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length")
        hkv = k.shape[1]
        if hq % hkv:
            raise ValueError(f"q has {hq} heads and k/v {hkv}: q heads must be a multiple of kv heads")
        if not isinstance(causal, bool):
            raise TypeError(f"causal={causal!r}: expected True or False")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p={dropout_p!r}: expected a float in [0, 1)")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ValueError(f"scale={scale!r}: expected a positive float or None (1/sqrt(head_dim))")
        nk = k.shape[2]
        kpm = normalize_key_padding_mask(key_padding_mask, b, nk)
        mask = normalize_mask(mask, b, hq, nq, nk)
        if kpm is not None and kpm.device != q.device:
            raise ValueError(f"key_padding_mask is on {kpm.device}, q on {q.device}")
        if mask is not None and mask.device != q.device:
            raise ValueError(f"mask is on {mask.device}, q on {q.device}")
        return cls(q, k, v, causal, mask, kpm, None if scale is None else float(scale), float(dropout_p))

    # ------------------------------------------------------------------ derived facts
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.q_heads // self.kv_heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_dim(self) -> int:
        return self.v.shape[3]

    @property
    def has_masks(self) -> bool:
        """Any mask besides causal."""
        return self.mask is not None or self.key_padding_mask is not None

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)

    @cached_property
    def keep(self) -> torch.Tensor | None:
        """All masks combined: bool, broadcastable to ``[B, Hq, Nq, Nk]``, or None."""
        return combine_masks(self.q_len, self.k_len, causal=self.causal, mask=self.mask,
                             key_padding_mask=self.key_padding_mask, device=self.q.device)

    def signature(self) -> tuple:
        """What the choice of backend may depend on (not the lengths, which change every decode step)."""
        mask_heads = None if self.mask is None else self.mask.shape[1]
        return (self.q.device.type, self.q.device.index, self.q.dtype, self.q_heads, self.kv_heads, self.head_dim,
                self.v_dim, self.causal, self.q_len == 1, self.q_len == self.k_len, mask_heads,
                self.key_padding_mask is not None, self.dropout_p > 0, self.needs_grad)
