"""Decoding caches: one object per attention layer, one protocol for every kind of layer state.

Every cache has ``seq_len`` (tokens seen), :meth:`Cache.layout` (what it holds, as the
:class:`~attnzoo.kv.KVLayout` every byte count is computed from), :meth:`Cache.nbytes` (the storage it
holds now: at most twice what the layout says, for growth) and :meth:`Cache.reset`. What a layer stores
differs by kind, and so does the one method its module calls:

* :class:`KVCache`: keys and values, ``update(k, v) -> (keys, values)`` to attend over
  (``[batch, kv_heads, seq, head_dim]``); grows geometrically, a decode step copies only the new token;
* :class:`~attnzoo.variants.rolling_cache.RollingKVCache`: the last ``window`` keys and values, same call;
* :class:`LatentCache`: a latent per token and a shared RoPE key (MLA), ``update(latent, rope_key) ->
  (latents, rope_keys)`` (``[batch, seq, kv_rank]``, ``[batch, seq, rope_dim]``);
* :class:`StateCache`: a fixed-size recurrent state (linear attention), ``state()`` then ``advance(new_state,
  tokens)``; its size does not depend on the sequence length.

Inside Hugging Face's ``generate()`` the patched modules keep these states in ``transformers``' own cache
objects (:class:`~attnzoo.patches.hf.HFCacheView` for keys and values; transformers' sliding-window layers for
a window), so the memory saved is the memory ``generate()`` holds.
"""
from __future__ import annotations

import torch

__all__ = ["Cache", "KVCache", "LatentCache", "StateCache"]


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Cache:
    """The protocol every layer cache follows (see the module docstring); subclasses implement all of it."""

    seq_len: int = 0

    def layout(self):
        """What the cache holds per token and per sequence (:class:`~attnzoo.kv.KVLayout`), for batch 1."""
        raise NotImplementedError  # subclasses implement

    def nbytes(self) -> int:
        """Bytes of tensor storage the cache holds now."""
        raise NotImplementedError  # subclasses implement

    def reset(self) -> None:
        raise NotImplementedError  # subclasses implement


class _Appender:
    """Append-only rows along dimension ``dim`` in a buffer that doubles (views of what was appended), or by
    concatenation under autograd, so gradients flow through what is cached."""

    def __init__(self, dim: int, min_capacity: int):
        self.dim, self.min_capacity = dim, min_capacity
        self.buf: torch.Tensor | None = None
        self.n = 0

    def view(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.n)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        d, m = self.dim, x.shape[self.dim]
        if self.buf is not None:
            other = [s for i, s in enumerate(self.buf.shape) if i != d]
            if other != [s for i, s in enumerate(x.shape) if i != d]:
                raise ValueError(f"the cache holds {tuple(self.buf.shape)} (dim {d} grows), got {tuple(x.shape)}; "
                                 "call reset() to start a new sequence")
        if x.requires_grad or (self.buf is not None and self.buf.requires_grad):
            self.buf = x if self.buf is None else torch.cat([self.view(), x], dim=d)
            self.n = self.buf.shape[d]
            return self.buf
        end = self.n + m
        if self.buf is None or end > self.buf.shape[d]:
            cap = max(self.min_capacity, end, 2 * (self.buf.shape[d] if self.buf is not None else 0))
            shape = list(x.shape)
            shape[d] = cap
            new = x.new_empty(shape)
            if self.buf is not None:
                new.narrow(d, 0, self.n).copy_(self.view())
            self.buf = new
        self.buf.narrow(d, self.n, m).copy_(x)
        self.n = end
        return self.view()


class KVCache(Cache):
    """Append-only K/V cache. ``update`` returns views of everything cached so far.

    Under autograd (inputs requiring grad) it concatenates instead of writing into a
    preallocated buffer, so gradients flow through the cached tensors.
    """

    def __init__(self, min_capacity: int = 256):
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self._k, self._v = _Appender(2, self.min_capacity), _Appender(2, self.min_capacity)
        self.seq_len = 0

    def update(self, k, v):
        if self._k.buf is not None and (k.shape[0] != self._k.buf.shape[0] or k.shape[1] != self._k.buf.shape[1]):
            raise ValueError(f"KVCache holds batch {self._k.buf.shape[0]} x {self._k.buf.shape[1]} heads, got new "
                             f"keys {tuple(k.shape)}; call reset() to start a new sequence")
        keys, values = self._k.append(k), self._v.append(v)
        self.seq_len = keys.shape[2]
        return keys, values

    def get(self):
        """Everything cached so far (what the last ``update`` returned)."""
        if self._k.buf is None:
            raise ValueError("KVCache is empty: call update() first")
        return self._k.view(), self._v.view()

    def layout(self):
        from ..kv import KVLayout

        k = self._k.buf
        return KVLayout() if k is None else KVLayout(kv_heads=k.shape[1], head_dim=k.shape[3])

    def nbytes(self) -> int:
        return _bytes(self._k.buf, self._v.buf)


class LatentCache(Cache):
    """MLA's cache: one latent ``[batch, seq, kv_rank]`` and one shared RoPE key ``[batch, seq, rope_dim]`` per
    token, nothing else: ``kv_rank + rope_dim`` numbers per token and layer. ``update(latent, rope_key)``
    appends and returns everything cached so far (views)."""

    def __init__(self, min_capacity: int = 256):
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self._c, self._r = _Appender(1, self.min_capacity), _Appender(1, self.min_capacity)
        self.seq_len = 0

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if latent.dim() != 3 or rope_key.dim() != 3 or latent.shape[:2] != rope_key.shape[:2]:
            raise ValueError(f"LatentCache.update takes latent [batch, seq, kv_rank] and rope_key [batch, seq, "
                             f"rope_dim] of one batch and length, got {tuple(latent.shape)} and {tuple(rope_key.shape)}")
        c, r = self._c.append(latent), self._r.append(rope_key)
        self.seq_len = c.shape[1]
        return c, r

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._c.buf is None:
            raise ValueError("LatentCache is empty: call update() first")
        return self._c.view(), self._r.view()

    def layout(self):
        from ..kv import KVLayout

        c, r = self._c.buf, self._r.buf
        return KVLayout() if c is None else KVLayout(latent=c.shape[2] + r.shape[2])

    def nbytes(self) -> int:
        return _bytes(self._c.buf, self._r.buf)


class StateCache(Cache):
    """A linear-attention layer's recurrent state: fixed-size tensors (e.g. ``S = sum_t phi(k_t) v_t^T``
    ``[batch, heads, features, head_dim]`` and its normaliser ``z = sum_t phi(k_t)`` ``[batch, heads,
    features]``), however long the sequence. ``state()`` gives what was stored (None before the first call);
    ``advance(new_state, tokens)`` stores the state after ``tokens`` more tokens."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._state: tuple[torch.Tensor, ...] | None = None
        self.seq_len = 0

    def state(self) -> tuple[torch.Tensor, ...] | None:
        return self._state

    def advance(self, new_state: tuple[torch.Tensor, ...], tokens: int) -> None:
        if self._state is not None:
            old = [tuple(t.shape) for t in self._state]
            if old != [tuple(t.shape) for t in new_state]:
                raise ValueError(f"StateCache holds states of shapes {old}, got {[tuple(t.shape) for t in new_state]}"
                                 "; call reset() to start a new sequence")
        self._state = tuple(new_state)
        self.seq_len += int(tokens)

    def layout(self):
        from ..kv import KVLayout

        if self._state is None:
            return KVLayout()
        batch = self._state[0].shape[0]
        return KVLayout(state=sum(t.numel() for t in self._state) // batch)

    def nbytes(self) -> int:
        return _bytes(*(self._state or ()))
