"""``reformer``: Reformer's LSH attention (Kitaev et al., 2020) on attnzoo's fused LSH op.

Each of ``num_hashes`` rounds hashes the queries (and keys) with seeded random rotations
(``h(x) = argmax([x R; -x R])``), sorts them by (bucket, position), and attends within chunks of ``bucket_size``
sorted tokens: a chunk reads itself and the chunk before. The rounds are combined by their log-sum-exp (one
softmax over what they read). See :mod:`attnzoo.ops.lsh` and docs/reformer.md.

Two ways to make the keys:

* ``shared_qk=True`` (the paper, a model trained as a Reformer): no ``k_proj``; the keys are the queries
  normalised to unit length (Hugging Face's ``_len_and_dim_norm``: ``q / rms(q) / sqrt(head_dim)``), the scores
  ``q . k`` unscaled, one hash per token, and a token reads itself only when nothing else is there;
* ``shared_qk=False`` (a converted softmax model: its own ``k_proj``): queries and keys hashed through SMYRF's
  asymmetric transforms (:mod:`attnzoo.ops.lsh.hashing`), sorted separately, scores ``q . k / sqrt(head_dim)``;
  every query also reads its own key (weighted as if every round read it).

Decoding (:class:`LSHCache`, causal only) keeps the keys, values and every cached token's buckets (the keys'; with
separate QK the queries' too, and the running key-norm bound), so a step hashes only its new tokens. The bucket
count is fixed at the cache's first call (``num_buckets``, or from the prompt's length); a decoded token then gets
exactly the output of the full forward over the tokens so far (with that bucket count): what the math allows, since
an earlier token's chunk depends on the tokens after it (tests/test_reformer.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_positive_int, check_type
from ..kv import KVLayout
from ..ops import apply_rope, rope_cos_sin
from ..ops.lsh import hash_keys, hash_queries, hash_vectors, lsh_attention, lsh_decode, num_buckets_for
from ..options import option
from ..registry import register
from .cache import Cache, _Appender, _bytes
from .dense import DenseAttention, DenseConfig

__all__ = ["ReformerOptions", "ReformerConfig", "ReformerAttention", "LSHCache", "LSHBuckets", "shared_keys",
           "lsh_buckets", "reformer_attention"]


@dataclass(frozen=True, kw_only=True)
class ReformerOptions:
    """``reformer``'s own options (the module config and ``attnzoo.Reformer`` share them)."""

    num_hashes: int = option(4, help="hash rounds, combined by their log-sum-exp")
    bucket_size: int = option(64, help="sorted tokens per chunk; a chunk reads itself and the chunk before")
    num_buckets: int | None = option(None, help="buckets per round, even (None: the length / bucket_size, rounded "
                                                "up to even; 1 bucket when the length fits one chunk)")
    seed: int = option(0, help="seed of the random rotations (the same in training and evaluation)")
    local_round: bool = option(False, help="one more round with every token in one bucket: chunks of consecutive "
                                           "positions (local attention beside the hashed rounds)")

    def validate(self):
        check_type("local_round", self.local_round, bool, "True or False")
        check_positive_int("num_hashes", self.num_hashes)
        check_positive_int("bucket_size", self.bucket_size)
        check_positive_int("num_buckets", self.num_buckets, allow_none=True)
        if self.num_buckets is not None and self.num_buckets > 1 and self.num_buckets % 2:
            raise ValueError(f"num_buckets={self.num_buckets}: angular LSH needs an even number of buckets "
                             f"(or 1, or None); e.g. {self.num_buckets + 1}")
        if self.num_buckets is not None and self.num_buckets > 32767:
            raise ValueError(f"num_buckets={self.num_buckets}: at most 32767 (bucket ids are cached as int16)")
        check_type("seed", self.seed, int, "an integer")


@dataclass(frozen=True, kw_only=True)
class ReformerConfig(ReformerOptions, DenseConfig):
    """Dense options plus ``num_hashes``, ``bucket_size``, ``num_buckets``, ``seed`` and ``shared_qk``.

    Args:
        num_hashes: hash rounds.
        bucket_size: sorted tokens per chunk (a chunk reads itself and the one before).
        num_buckets: buckets per round (None: from the length).
        seed: seed of the random rotations.
        shared_qk: keys = normalised queries (no ``k_proj``; the paper); False: a ``k_proj`` of its own
            (a converted model).
    """

    shared_qk: bool = option(True, help="keys are the normalised queries (no k_proj), as the paper; False: "
                                        "separate keys (converted models)")

    def validate(self):
        ReformerOptions.validate(self)
        check_type("shared_qk", self.shared_qk, bool, "True or False")
        DenseConfig.validate(self)
        if self.context_dim is not None:
            raise ValueError(f"context_dim={self.context_dim}: reformer is self-attention; use 'mha'/'gqa' for "
                             "cross-attention")
        if self.shared_qk and self.groups is not None and self.groups != self.heads:
            raise ValueError(f"groups={self.groups}: with shared_qk=True the keys are the queries, one per query head "
                             f"(groups must be None or heads={self.heads}); use shared_qk=False for grouped KV heads")

    def kv_layout(self) -> KVLayout:
        """K/V of ``kv_heads`` heads plus the bucket ids the cache keeps per token (``num_hashes`` per query head
        for the keys, as many again for the queries with separate QK), counted as ``latent`` elements (int16 ids:
        exact bytes for a 16-bit cache)."""
        ids = self.heads * (self.num_hashes + self.local_round) * (1 if self.shared_qk else 2)
        return KVLayout(kv_heads=self.kv_heads, head_dim=self.head_dim_, latent=ids)


def shared_keys(q: torch.Tensor) -> torch.Tensor:
    """Shared-QK keys: the queries normalised to unit length (``q / rms(q) / sqrt(head_dim)``, Hugging Face's
    ``_len_and_dim_norm``), as one RMS norm whose weight is ``1 / sqrt(head_dim)`` (one fused kernel each way on
    CUDA, statistics in float32)."""
    d = q.shape[-1]
    return torch.nn.functional.rms_norm(q, (d,), q.new_full((d,), d ** -0.5), eps=1e-6)


class LSHBuckets:
    """The bucket ids of every token seen (``[batch, heads, num_hashes, n]``, int16): the queries' and, with
    separate QK, the keys'; the running maximum of the key norms (``[batch, heads]``, separate QK's hash) and the
    bucket count, fixed at the first call. What :class:`LSHCache` keeps beside the keys and values, and what a
    converted Hugging Face layer keeps beside ``transformers``' cache."""

    def __init__(self, min_capacity: int = 256):
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self._qb, self._kb = _Appender(3, self.min_capacity), _Appender(3, self.min_capacity)
        self.num_buckets: int | None = None
        self.key_bound: torch.Tensor | None = None
        self.seq_len = 0

    def append(self, q_buckets, k_buckets=None, key_bound=None):
        """Append the new tokens' buckets; returns every token's ``(q_buckets, k_buckets)`` (int64)."""
        qb = self._qb.append(q_buckets.to(torch.int16))
        kb = self._kb.append(k_buckets.to(torch.int16)) if k_buckets is not None else None
        self.key_bound = key_bound
        self.seq_len = qb.shape[3]
        return qb.long(), None if kb is None else kb.long()

    def ids_per_token(self) -> int:
        qb = self._qb.buf
        return 0 if qb is None else qb.shape[1] * qb.shape[2] * (1 if self._kb.buf is None else 2)

    def nbytes(self) -> int:
        return _bytes(self._qb.buf, self._kb.buf, self.key_bound)


class LSHCache(Cache):
    """A causal ``reformer`` layer's decoding state: keys and values (``update(k, v)`` as
    :class:`~attnzoo.variants.cache.KVCache`) and the bucket ids of every cached token (``buckets``, an
    :class:`LSHBuckets`), so a step hashes only its new tokens."""

    def __init__(self, min_capacity: int = 256):
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self._k, self._v = _Appender(2, self.min_capacity), _Appender(2, self.min_capacity)
        self.buckets = LSHBuckets(self.min_capacity)
        self.seq_len = 0

    def update(self, k, v):
        if self._k.buf is not None and k.shape[0] != self._k.buf.shape[0]:
            raise ValueError(f"LSHCache holds batch {self._k.buf.shape[0]}, got new keys {tuple(k.shape)}; call "
                             "reset() to start a new sequence")
        keys, values = self._k.append(k), self._v.append(v)
        self.seq_len = keys.shape[2]
        return keys, values

    def layout(self) -> KVLayout:
        k = self._k.buf
        if k is None:
            return KVLayout()
        return KVLayout(kv_heads=k.shape[1], head_dim=k.shape[3], latent=self.buckets.ids_per_token())

    def nbytes(self) -> int:
        return _bytes(self._k.buf, self._v.buf) + self.buckets.nbytes()


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def lsh_buckets(options: ReformerOptions, q: torch.Tensor, k: torch.Tensor | None, num_buckets: int, causal: bool,
                key_bound: torch.Tensor | None = None, keep: torch.Tensor | None = None):
    """``(q_buckets, k_buckets)`` ``[batch, heads, num_hashes, n]`` of queries ``q`` and keys ``k`` (None: shared
    QK, whose keys share the queries' buckets); ``key_bound``: the key-norm bound of the tokens before them;
    ``keep``: bool ``[batch, n]``, padded keys (False) do not count in the bound."""
    o = options
    with torch.no_grad():
        if k is None:
            qb, kb = hash_vectors(q.detach(), o.num_hashes, num_buckets, o.seed), None
        else:
            qb = hash_queries(q.detach(), o.num_hashes, num_buckets, o.seed)
            kb = hash_keys(_expand(k.detach(), q.shape[1]), o.num_hashes, num_buckets, o.seed, causal,
                           prior=key_bound, keep=keep)
    if o.local_round:  # one bucket: sorted by position, chunks of consecutive tokens
        qb = torch.cat([qb, torch.zeros_like(qb[:, :, :1])], dim=2)
        kb = None if kb is None else torch.cat([kb, torch.zeros_like(kb[:, :, :1])], dim=2)
    return qb, kb


def reformer_attention(options: ReformerOptions, q, k, v, *, causal: bool, shared_qk: bool,
                       key_padding_mask=None, state: LSHBuckets | None = None, scale: float | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """LSH attention of projected heads (after RoPE): ``q [batch, heads, m, d]`` the new queries, ``k``/``v``
    ``[batch, heads|kv, n, d]`` every key (the last ``m`` are the new tokens'; shared QK: the
    :func:`shared_keys` of the queries). ``state``: the buckets of the ``n - m`` earlier tokens (decoding; updated
    here), None for a whole sequence. Returns ``[batch, heads, m, d]``."""
    o = options
    m, n = q.shape[2], k.shape[2]
    if key_padding_mask is not None and key_padding_mask.shape[-1] != n:
        raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} tokens, the keys are {n} (cached + "
                         "new): pass the mask of the whole sequence so far")
    if state is None:
        if m != n:
            raise ValueError(f"reformer: {m} queries for {n} keys without a bucket state (decoding needs the "
                             "buckets of the earlier tokens: an LSHCache)")
        nb = num_buckets_for(n, o.bucket_size, o.num_buckets)
        qb, kb = lsh_buckets(o, q, None if shared_qk else k, nb, causal, keep=key_padding_mask)
        return lsh_attention(q, k, v, qb, kb, bucket_size=o.bucket_size, causal=causal,
                             key_padding_mask=key_padding_mask, scale=scale, backend=backend)
    if state.seq_len != n - m:
        raise ValueError(f"reformer: the bucket state holds {state.seq_len} tokens, but {n} keys came with {m} new "
                         "queries (a reordered or static cache?); decode from a fresh prompt with a dynamic cache")
    if state.num_buckets is None:
        state.num_buckets = num_buckets_for(n, o.bucket_size, o.num_buckets)
    k_new = k[:, :, n - m:]
    keep = None if key_padding_mask is None else key_padding_mask[:, n - m:].bool()
    qb, kb = lsh_buckets(o, q, None if shared_qk else k_new, state.num_buckets, causal, key_bound=state.key_bound,
                         keep=keep)
    bound = None
    if not shared_qk:
        norms = k_new.detach().norm(dim=-1)
        if keep is not None:
            norms = norms * keep[:, None, :].to(norms.dtype)
        bound = _expand(norms.amax(dim=-1, keepdim=True), q.shape[1])[..., 0]
        bound = bound if state.key_bound is None else torch.maximum(bound, state.key_bound)
    qb_all, kb_all = state.append(qb, kb, bound)
    if m == n:
        return lsh_attention(q, k, v, qb_all, kb_all, bucket_size=o.bucket_size, causal=causal,
                             key_padding_mask=key_padding_mask, scale=scale, backend=backend)
    return lsh_decode(q, k, v, qb_all, kb_all, bucket_size=o.bucket_size, causal=causal,
                      key_padding_mask=key_padding_mask, scale=scale)


_EX = {"dim": 64, "heads": 4, "num_hashes": 2, "bucket_size": 4}


@register("reformer", ReformerConfig, converter="attnzoo.patches.reformer:reformer", example=_EX,
          description="Reformer LSH attention: `num_hashes` rounds of angular LSH, chunks of `bucket_size`")
class ReformerAttention(DenseAttention):
    """Reformer's LSH attention (see the module docstring). Parameters ``q_proj``, ``v_proj``, ``o_proj`` and,
    with ``shared_qk=False``, ``k_proj`` (Hugging Face names); attention through
    :func:`attnzoo.ops.lsh.lsh_attention` (fused Triton kernels on CUDA)."""

    def __init__(self, config: ReformerConfig):
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config={type(config).__name__}: expected a ReformerConfig")
        super().__init__(config)
        if config.shared_qk:
            del self.k_proj

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, num_hashes={c.num_hashes}, bucket_size={c.bucket_size}, "
                f"num_buckets={c.num_buckets}, local_round={c.local_round}, shared_qk={c.shared_qk}, seed={c.seed}")

    def make_cache(self) -> Cache:
        """A fresh :class:`LSHCache` (causal modules decode; bidirectional ones attend to whole sequences)."""
        return LSHCache()

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        """``[batch, seq, dim] -> [batch, seq, dim]``.

        Args:
            hidden_states: ``[batch, seq, dim]``.
            key_padding_mask: bool ``[batch, k_len]`` (cached + new tokens), True = real token.
            position_ids: RoPE positions (default: continue from the cache).
            cache: an :class:`LSHCache` (causal modules only).

        ``context`` and ``attn_mask`` are not taken: the buckets are the mask (padding goes through
        ``key_padding_mask``).
        """
        c = self.config
        if context is not None:
            raise ValueError("reformer is self-attention: context (cross-attention) is not supported; use 'mha'/'gqa'")
        if attn_mask is not None:
            raise ValueError("reformer: attn_mask is not supported, the buckets are the mask; pass padding as "
                             "key_padding_mask [batch, k_len]")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected [batch, seq, dim]")
        if cache is not None and not isinstance(cache, LSHCache):
            raise TypeError(f"cache={type(cache).__name__}: reformer decodes with an LSHCache (module.make_cache())")
        if cache is not None and not c.causal:
            raise ValueError("reformer decodes with a cache only when causal=True (a bidirectional layer reads every "
                             "token, so it attends to whole sequences)")
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        k = None if c.shared_qk else self.k_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.inv_freq is not None:
            start = cache.seq_len if cache is not None else 0
            pos = self._positions(position_ids, n, start, hidden_states.device)
            cos, sin = rope_cos_sin(pos, self.inv_freq, c.rope.style)
            q = apply_rope(q, cos, sin, c.rope.style)
            k = None if k is None else apply_rope(k, cos, sin, c.rope.style)
        out = self.attend(q, k, v, key_padding_mask=key_padding_mask, cache=cache)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def buckets(self, q: torch.Tensor, k: torch.Tensor | None, num_buckets: int, key_bound=None, keep=None):
        """``(q_buckets, k_buckets)`` ``[batch, heads, num_hashes, n]`` (``k_buckets`` None with shared QK;
        arguments as :func:`lsh_buckets`)."""
        return lsh_buckets(self.config, q, k, num_buckets, self.config.causal, key_bound, keep)

    def attend(self, q, k, v, *, key_padding_mask=None, cache: LSHCache | None = None, backend: str | None = None):
        """LSH attention on projected heads ``[batch, heads, seq, head_dim]`` (after RoPE; ``k`` None for shared
        QK, whose keys are :func:`shared_keys` of the queries). Returns ``[batch, heads, seq, head_dim]``."""
        c = self.config
        if c.shared_qk:
            k = shared_keys(q)
        state = None
        if cache is not None:
            k, v = cache.update(k, v)
            state = cache.buckets
        return reformer_attention(c, q, k, v, causal=c.causal, shared_qk=c.shared_qk,
                                  key_padding_mask=key_padding_mask, state=state,
                                  scale=1.0 if c.shared_qk else None, backend=backend)
