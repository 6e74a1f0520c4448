"""A rolling KV cache for causal sliding-window attention: memory stays constant as the sequence grows.

A causal query at position ``p`` with ``window`` sees keys ``p - window .. p`` (see
:mod:`attnzoo.ops.sparse.patterns`), so after each step only the last ``window`` keys are
ever needed again. :class:`RollingKVCache` keeps them, in position order, in a buffer of
``2 * window`` slots: new keys are written in place after the kept ones, and when the
buffer is full the last ``window`` keys move to its front (one copy every ``window``
decode steps). ``update`` returns the kept past plus the new keys; the module attends to
them with the same pattern (a sliding window depends only on ``i - j``), so decoding equals
the full forward exactly. A ``key_padding_mask`` for a module using this cache covers the
whole sequence so far (cached + new, as with :class:`~attnzoo.variants.cache.KVCache`);
the module takes its last ``k_len`` columns.
"""
from __future__ import annotations

import torch

from ..errors import check_positive_int
from .cache import Cache

__all__ = ["RollingKVCache"]


class RollingKVCache(Cache):
    """Keeps the last ``window`` keys/values (``[batch, kv_heads, window, head_dim]`` at most, plus the
    in-place room for ``window`` more). Under autograd it concatenates instead of writing in place."""

    def __init__(self, window: int):
        check_positive_int("window", window)
        self.window = window
        self.reset()

    def reset(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._lo = self._hi = 0  # the kept keys are self._k[:, :, lo:hi]
        self.seq_len = 0

    @property
    def kept(self) -> int:
        """How many past keys are held now (at most ``window``)."""
        return self._hi - self._lo

    def _check(self, k):
        if self._k is not None and (k.shape[0] != self._k.shape[0] or k.shape[1] != self._k.shape[1]):
            raise ValueError(f"RollingKVCache holds batch {self._k.shape[0]} x {self._k.shape[1]} heads, got new keys "
                             f"{tuple(k.shape)}; call reset() to start a new sequence")

    def update(self, k, v):
        self._check(k)
        n, w = k.shape[2], self.window
        grad = k.requires_grad or v.requires_grad or (self._k is not None and self._k.requires_grad)
        in_place = (not grad and self._k is not None and not self._k.requires_grad
                    and self._hi + n <= self._k.shape[2])
        if in_place:
            self._k[:, :, self._hi:self._hi + n] = k
            self._v[:, :, self._hi:self._hi + n] = v
            self._hi += n
            keys, values = self._k[:, :, self._lo:self._hi], self._v[:, :, self._lo:self._hi]
            self._lo = max(self._lo, self._hi - w)
        else:
            if self.kept:
                keys = torch.cat([self._k[:, :, self._lo:self._hi], k], dim=2)
                values = torch.cat([self._v[:, :, self._lo:self._hi], v], dim=2)
            else:
                keys, values = k, v
            self._keep_tail(keys, values, grad)
        self.seq_len += n
        return keys, values

    def _keep_tail(self, keys, values, grad):
        """Hold the last ``window`` of ``keys``/``values``, at the front of a ``2 * window`` buffer."""
        w = self.window
        tail_k, tail_v = keys[:, :, -w:], values[:, :, -w:]
        m = tail_k.shape[2]
        if grad:
            self._k, self._v = tail_k, tail_v
        else:
            if self._k is None or self._k.requires_grad or self._k.shape[2] < 2 * w or self._k.dtype != keys.dtype:
                self._k = keys.new_empty(keys.shape[0], keys.shape[1], 2 * w, keys.shape[3])
                self._v = values.new_empty(values.shape[0], values.shape[1], 2 * w, values.shape[3])
            self._k[:, :, :m] = tail_k
            self._v[:, :, :m] = tail_v
        self._lo, self._hi = 0, m

    def get(self):
        if self._k is None:
            raise ValueError("RollingKVCache is empty: call update() first")
        return self._k[:, :, self._lo:self._hi], self._v[:, :, self._lo:self._hi]

    def layout(self):
        from ..kv import KVLayout

        k = self._k
        return KVLayout(window=self.window) if k is None else KVLayout(k.shape[1], k.shape[3], window=self.window)

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()
