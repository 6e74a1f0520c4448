"""The dense family: multi-head (``mha``), grouped-query (``gqa``) and multi-query (``mqa``)
attention, one implementation.

``mha`` is ``groups == heads``, ``mqa`` is ``groups == 1``; ``groups`` is always the
number of KV heads (``attnzoo.create("gqa", dim=4096, heads=32, groups=8)`` keeps 8
KV heads). Query head ``h`` reads KV head ``h // (heads // groups)``, the layout of
Hugging Face's ``num_key_value_heads``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_positive_int, check_type
from ..kv import KVLayout
from ..options import REQUIRED, option
from ..ops import apply_rope, attention, inv_frequencies, rope_cos_sin
from ..registry import register
from .cache import Cache, KVCache
from .config import RopeConfig, VariantConfig

__all__ = ["KVHeadsOptions", "MHAOptions", "GQAOptions", "MQAOptions", "DenseConfig", "MHAConfig", "GQAConfig", "MQAConfig", "DenseAttention"]


@dataclass(frozen=True, kw_only=True)
class KVHeadsOptions:
    """The dense family's own option, shared by the module configs and the patch configs (``attnzoo.GQA``)."""

    groups: int | None = option(None, help="KV heads: a divisor of the query heads (None: one per query head)")


@dataclass(frozen=True, kw_only=True)
class DenseConfig(KVHeadsOptions, VariantConfig):
    """Options of the dense family (see each field's help; ``attnzoo list --json`` prints them)."""

    dim: int = option(REQUIRED, help="model width (input and output of the module)")
    heads: int = option(REQUIRED, help="query heads")
    head_dim: int | None = option(None, help="per-head width (None: dim // heads, which must divide evenly)")
    bias: bool = option(False, help="biases on q_proj, k_proj, v_proj")
    out_bias: bool | None = option(None, help="bias on o_proj (None: same as bias)")
    causal: bool = option(False, help="causal self-attention")
    rope: bool | dict | RopeConfig | None = option(False, help="rotary embeddings on queries and keys: False, True, "
                                                               "a dict or a RopeConfig")
    dropout: float = option(0.0, help="attention-probability dropout in training")
    context_dim: int | None = option(None, help="width of the context tensor for cross-attention (None: dim)")

    def validate(self):
        check_positive_int("dim", self.dim)
        check_positive_int("heads", self.heads)
        check_positive_int("groups", self.groups, allow_none=True)
        check_positive_int("head_dim", self.head_dim, allow_none=True)
        check_positive_int("context_dim", self.context_dim, allow_none=True)
        check_type("bias", self.bias, bool, "True or False")
        if self.out_bias is not None:
            check_type("out_bias", self.out_bias, bool, "True, False or None")
        check_type("causal", self.causal, bool, "True or False")
        check_type("dropout", self.dropout, (int, float), "a float in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: expected a float in [0, 1)")
        if self.groups is not None and self.heads % self.groups:
            divisors = [g for g in range(1, self.heads + 1) if self.heads % g == 0]
            raise ValueError(f"groups={self.groups}: must divide heads={self.heads}; valid groups: {divisors}")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide dim={self.dim}: pass head_dim explicitly "
                             f"or choose heads among {[h for h in range(1, 65) if self.dim % h == 0]}")
        rope = RopeConfig.coerce(self.rope)
        object.__setattr__(self, "rope", rope)
        if rope is not None and rope.rotary_dim is not None and rope.rotary_dim > self.head_dim_:
            raise ValueError(f"rope.rotary_dim={rope.rotary_dim}: must be <= head_dim={self.head_dim_}")
        if rope is not None and rope.rotary_dim is None and self.head_dim_ % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim_}")

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def kv_heads(self) -> int:
        return self.groups if self.groups is not None else self.heads

    def kv_layout(self) -> KVLayout:
        """What this layer caches: keys and values of ``kv_heads`` heads (see :class:`~attnzoo.kv.KVLayout`)."""
        return KVLayout(kv_heads=self.kv_heads, head_dim=self.head_dim_)


@dataclass(frozen=True, kw_only=True)
class MHAOptions(KVHeadsOptions):
    """``mha``: one KV head per query head."""

    def kv_heads_for(self, heads: int | None) -> int | None:
        """The KV heads this variant leaves a layer of ``heads`` query heads (None: not known yet); the one
        place the variant's rule on ``groups`` is written, for the module config, the patch config and the
        converter alike."""
        if self.groups is not None and heads is not None and self.groups != heads:
            raise ValueError(f"groups={self.groups}: mha has one KV head per query head, so groups must equal "
                             f"heads={heads} (or be omitted); use 'gqa' (1 < groups < heads) or 'mqa' (groups=1)")
        return heads


@dataclass(frozen=True, kw_only=True)
class GQAOptions(KVHeadsOptions):
    """``gqa``: ``groups`` KV heads shared by ``heads // groups`` query heads each (required)."""

    def kv_heads_for(self, heads: int | None) -> int | None:
        if self.groups is None:
            raise ValueError("gqa needs groups (the number of KV heads to keep, a divisor of the query heads), "
                             "e.g. groups=8")
        return self.groups


@dataclass(frozen=True, kw_only=True)
class MQAOptions(KVHeadsOptions):
    """``mqa``: a single KV head (``groups`` must be None or 1)."""

    groups: int | None = option(1, help="KV heads: 1 (mqa keeps one)")

    def kv_heads_for(self, heads: int | None) -> int | None:
        if self.groups not in (None, 1):
            raise ValueError(f"groups={self.groups}: mqa keeps one KV head, so groups must be 1 (or omitted); "
                             f"use 'gqa' for {self.groups} KV heads")
        return 1


@dataclass(frozen=True, kw_only=True)
class MHAConfig(MHAOptions, DenseConfig):
    """``mha``: one KV head per query head (``groups`` must be None or equal ``heads``)."""

    def validate(self):
        self.kv_heads_for(self.heads)
        super().validate()


@dataclass(frozen=True, kw_only=True)
class GQAConfig(GQAOptions, DenseConfig):
    """``gqa``: ``groups`` KV heads shared by ``heads // groups`` query heads each (required)."""

    def validate(self):
        self.kv_heads_for(self.heads)
        super().validate()


@dataclass(frozen=True, kw_only=True)
class MQAConfig(MQAOptions, DenseConfig):
    """``mqa``: a single KV head (``groups`` must be None or 1)."""

    def validate(self):
        self.kv_heads_for(self.heads)
        super().validate()


_EXAMPLE = {"dim": 64, "heads": 4}


_KV = "attnzoo.patches.kv_heads:"


@register("mha", MHAConfig, converter=_KV + "mha", example=_EXAMPLE,
          description="multi-head attention (one KV head per query head)")
@register("gqa", GQAConfig, converter=_KV + "gqa", example={**_EXAMPLE, "groups": 2},
          description="grouped-query attention: `groups` KV heads shared across query heads")
@register("mqa", MQAConfig, converter=_KV + "mqa", example=_EXAMPLE, description="multi-query attention: one KV head")
class DenseAttention(nn.Module):
    """Dense attention with grouped KV heads, optional RoPE, cross-attention and a KV cache.

    Parameters ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` are named as in Hugging Face
    models. The attention itself runs through :func:`attnzoo.ops.attention` (fused backends).
    """

    def __init__(self, config: DenseConfig):
        super().__init__()
        if not isinstance(config, DenseConfig):
            raise TypeError(f"config={type(config).__name__}: expected a DenseConfig")
        self.config = config
        c = config
        hd = c.head_dim_
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, hd
        kv_in = c.context_dim or c.dim
        self.q_proj = nn.Linear(c.dim, c.heads * hd, bias=c.bias)
        self.k_proj = nn.Linear(kv_in, c.kv_heads * hd, bias=c.bias)
        self.v_proj = nn.Linear(kv_in, c.kv_heads * hd, bias=c.bias)
        self.o_proj = nn.Linear(c.heads * hd, c.dim, bias=c.bias if c.out_bias is None else c.out_bias)
        if c.rope is not None:
            self.register_buffer("inv_freq", inv_frequencies(c.rope.rotary_dim or hd, c.rope.base), persistent=False)
        else:
            self.inv_freq = None

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.heads}, kv_heads={c.kv_heads}, head_dim={self.head_dim}, causal={c.causal}, "
                f"rope={'off' if c.rope is None else f'{c.rope.style}/{c.rope.rotary_dim or self.head_dim}'}")

    def _positions(self, position_ids, n, start, device):
        if position_ids is None:
            return torch.arange(start, start + n, device=device)
        if position_ids.shape[-1] != n:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}: expected [{n}] or [batch, {n}]")
        return position_ids

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        """Attend and project back.

        Args:
            hidden_states: ``[batch, seq, dim]``.
            context: ``[batch, ctx_len, context_dim]`` for cross-attention (queries from
                ``hidden_states``, keys/values from ``context``; no RoPE, not causal). With a
                ``cache`` the context's K/V are computed on the first call and reused after.
            key_padding_mask: bool ``[batch, k_len]``, True = real token; ``k_len`` counts every
                key attended to: cached + new for self-attention, ``ctx_len`` for cross.
            attn_mask: bool keep mask broadcastable to ``[batch, heads, seq, k_len]``.
            position_ids: ``[seq]`` or ``[batch, seq]`` RoPE positions (default: continue from the cache).
            cache: a :class:`~attnzoo.variants.cache.Cache` for incremental decoding.

        Returns:
            ``[batch, seq, dim]``.
        """
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected [batch, seq, dim]")
        b, n, _ = hidden_states.shape
        c = self.config
        q = self.q_proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if context is not None:
            if c.causal:
                raise ValueError("this module has causal=True, which applies to self-attention; build the "
                                 "cross-attention module with causal=False")
            if cache is not None and cache.seq_len > 0:
                k, v = cache.get()  # the context's K/V, projected on the first call
            else:
                k, v = self._kv(context, b)
                if cache is not None:
                    k, v = cache.update(k, v)
            causal = False
        else:
            k, v = self._kv(hidden_states, b)
            if self.inv_freq is not None:
                start = cache.seq_len if cache is not None else 0
                pos = self._positions(position_ids, n, start, hidden_states.device)
                cos, sin = rope_cos_sin(pos, self.inv_freq, c.rope.style)
                q, k = apply_rope(q, cos, sin, c.rope.style), apply_rope(k, cos, sin, c.rope.style)
            if cache is not None:
                k, v = cache.update(k, v)
            causal = c.causal
        out = self._attend(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           cache=cache, hidden_states=hidden_states)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def _attend(self, q, k, v, *, causal, attn_mask, key_padding_mask, cache, hidden_states):
        """The attention proper on projected heads ``[batch, heads, seq, head_dim]`` (after RoPE and the
        cache update); subclasses with another attention (the sparse patterns) override this."""
        return attention(q, k, v, causal=causal, mask=attn_mask, key_padding_mask=key_padding_mask,
                         dropout_p=self.config.dropout if self.training else 0.0)

    def make_cache(self) -> Cache:
        """A fresh cache for incremental decoding with this module."""
        return KVCache()

    def _kv(self, x, b):
        m = x.shape[1]
        k = self.k_proj(x).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v
