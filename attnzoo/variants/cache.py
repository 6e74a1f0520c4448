"""KV caches for incremental decoding with attnzoo modules.

One cache object per attention layer. :class:`KVCache` appends keys and values
(``[batch, kv_heads, seq, head_dim]``), growing its buffer geometrically so a
decode step copies only the new token. Specialised caches (a rolling window for
sliding-window attention, a latent cache for MLA) subclass :class:`Cache` and keep
the same ``update``/``seq_len`` interface.
"""
from __future__ import annotations

import torch

__all__ = ["Cache", "KVCache"]


class Cache:
    """Interface: ``update(k, v) -> (keys, values)`` to attend over, ``seq_len``, ``nbytes()``."""

    seq_len: int = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # subclasses implement

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything cached so far (what the last ``update`` returned)."""
        raise NotImplementedError  # subclasses implement

    def nbytes(self) -> int:
        """Bytes of tensor storage the cache holds now."""
        raise NotImplementedError  # subclasses implement

    def reset(self) -> None:
        raise NotImplementedError  # subclasses implement


class KVCache(Cache):
    """Append-only K/V cache. ``update`` returns views of everything cached so far.

    Under autograd (inputs requiring grad) it concatenates instead of writing into a
    preallocated buffer, so gradients flow through the cached tensors.
    """

    def __init__(self, min_capacity: int = 256):
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.seq_len = 0

    def update(self, k, v):
        n = k.shape[2]
        if self._k is None:
            if k.requires_grad or v.requires_grad:
                self._k, self._v = k, v
            else:
                cap = max(self.min_capacity, n)
                self._k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
                self._v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
                self._k[:, :, :n] = k
                self._v[:, :, :n] = v
            self.seq_len = n
            return self._k[:, :, :n], self._v[:, :, :n]
        if k.shape[0] != self._k.shape[0] or k.shape[1] != self._k.shape[1]:
            raise ValueError(f"KVCache holds batch {self._k.shape[0]} x {self._k.shape[1]} heads, got new keys "
                             f"{tuple(k.shape)}; call reset() to start a new sequence")
        end = self.seq_len + n
        if k.requires_grad or v.requires_grad or self._k.requires_grad:
            self._k = torch.cat([self._k[:, :, :self.seq_len], k], dim=2)
            self._v = torch.cat([self._v[:, :, :self.seq_len], v], dim=2)
        else:
            if end > self._k.shape[2]:
                cap = max(end, 2 * self._k.shape[2])
                for name in ("_k", "_v"):
                    old = getattr(self, name)
                    new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
                    new[:, :, :self.seq_len] = old[:, :, :self.seq_len]
                    setattr(self, name, new)
            self._k[:, :, self.seq_len:end] = k
            self._v[:, :, self.seq_len:end] = v
        self.seq_len = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def get(self):
        if self._k is None:
            raise ValueError("KVCache is empty: call update() first")
        return self._k[:, :, :self.seq_len], self._v[:, :, :self.seq_len]

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()
