"""``mla``: multi-head latent attention (DeepSeek-V2/V3) with decoupled RoPE and a latent-only cache.

Per token a layer caches one latent ``c`` of ``kv_rank`` numbers (after ``kv_a_layernorm``) and its RoPE keys
(``rope_dim`` numbers each: one shared key, DeepSeek's layout, or one per KV head with ``rope_keys="per_head"``),
nothing else. Parameters are named as Hugging Face's ``DeepseekV3Attention`` (``q_proj`` or
``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``), so state dicts map one to one.

Two execution paths (:mod:`attnzoo.ops.mla`):

* without past tokens (prefill, training): ``kv_b_proj`` expands the latent into per-head keys
  (``nope_dim + rope_dim``) and values (``v_dim``), and :func:`attnzoo.ops.attention` runs it (a fused kernel
  with a q/k head dim different from the v head dim);
* with past tokens in a cache (decoding): **absorbed**. ``kv_b_proj``'s key half is folded into the queries,
  attention runs over the cached ``[c; k_rope]`` directly (:func:`attnzoo.ops.mla.latent_attention`: on CUDA a
  split-KV Triton kernel for one new token), and the value half is applied after. The cache is never expanded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_choice, check_positive_int, check_type
from ..kv import KVLayout
from ..ops import apply_rope, attention, rope_cos_sin
from ..ops.mla import absorb_query, absorbed_output, latent_attention
from ..options import REQUIRED, option
from ..registry import register
from .cache import Cache, LatentCache
from .config import VariantConfig

__all__ = ["ROPE_KEYS", "MLAOptions", "MLAConfig", "MLAAttention", "LatentRMSNorm"]

#: the rope-key layouts: one key shared by every head (DeepSeek), or one per KV head (exact conversions)
ROPE_KEYS = ("shared", "per_head")


@dataclass(frozen=True, kw_only=True)
class MLAOptions:
    """MLA's own options, shared by the module config (:class:`MLAConfig`) and the patch config (``attnzoo.MLA``)."""

    kv_rank: int = option(512, help="latent numbers cached per token for keys and values together (kv_lora_rank)")
    rope_dim: int = option(64, help="RoPE dims of each rope key and query head (qk_rope_head_dim); even")
    q_rank: int | None = option(None, help="low-rank queries: q_a_proj to q_rank, RMSNorm, q_b_proj (q_lora_rank; "
                                           "None: one q_proj)")
    nope_dim: int | None = option(None, help="per-head query/key dims without RoPE (qk_nope_head_dim; None: the "
                                             "model's head_dim)")
    v_dim: int | None = option(None, help="per-head value dims (v_head_dim; None: the model's head_dim)")
    rope_keys: str = option("shared", help="'shared': one rope key per token for all heads (DeepSeek's layout, "
                                           "a deepseek_v3 checkpoint); 'per_head': one per KV head (kv_heads of them: "
                                           "exact conversions of GQA/MHA, attnzoo.from_pretrained)")
    kv_heads: int | None = option(None, help="rope keys per token with rope_keys='per_head' (the source's KV heads, "
                                             "a divisor of the query heads); None with 'shared'")

    def validate_mla(self, heads: int | None) -> None:
        """The checks of the MLA options (``heads``: the query heads, None when not known yet)."""
        check_positive_int("kv_rank", self.kv_rank)
        check_positive_int("rope_dim", self.rope_dim, minimum=2)
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim={self.rope_dim}: expected an even number (RoPE rotates pairs)")
        check_positive_int("q_rank", self.q_rank, allow_none=True)
        check_positive_int("nope_dim", self.nope_dim, allow_none=True, minimum=0)
        check_positive_int("v_dim", self.v_dim, allow_none=True)
        check_choice("rope_keys", self.rope_keys, ROPE_KEYS)
        check_positive_int("kv_heads", self.kv_heads, allow_none=True)
        if self.rope_keys == "shared" and self.kv_heads not in (None, 1):
            raise ValueError(f"kv_heads={self.kv_heads}: with rope_keys='shared' every head reads one rope key; "
                             "pass rope_keys='per_head' for one rope key per KV head, or omit kv_heads")
        if self.rope_keys == "per_head" and self.kv_heads is None:
            raise ValueError("rope_keys='per_head' needs kv_heads (rope keys per token, e.g. the source's "
                             "num_key_value_heads)")
        if self.rope_keys == "per_head" and heads is not None and heads % self.kv_heads:
            divisors = [g for g in range(1, heads + 1) if heads % g == 0]
            raise ValueError(f"kv_heads={self.kv_heads}: must divide heads={heads}; valid kv_heads: {divisors}")

    @property
    def rope_heads(self) -> int:
        """Rope keys per token: 1 (shared) or ``kv_heads`` (per_head)."""
        return 1 if self.rope_keys == "shared" else int(self.kv_heads)

    def mla_layout(self) -> KVLayout:
        """What a layer caches: the latent and the rope keys, ``kv_rank + rope_heads * rope_dim`` per token."""
        return KVLayout(latent=self.kv_rank + self.rope_heads * self.rope_dim)


@dataclass(frozen=True, kw_only=True)
class MLAConfig(MLAOptions, VariantConfig):
    """Options of the ``mla`` module (see each field's help; ``attnzoo list --json`` prints them)."""

    dim: int = option(REQUIRED, help="model width (input and output of the module)")
    heads: int = option(REQUIRED, help="query heads")
    bias: bool = option(False, help="biases on q_a_proj, kv_a_proj_with_mqa and o_proj (attention_bias)")
    q_bias: bool = option(False, help="bias on q_proj (a converted Qwen2-style model; DeepSeek has none)")
    causal: bool = option(False, help="causal self-attention")
    dropout: float = option(0.0, help="attention-probability dropout in training")
    scale: float | None = option(None, help="softmax scale (None: 1/sqrt(nope_dim + rope_dim); DeepSeek's YaRN "
                                            "models pass their mscale-corrected one)")
    latent_norm: bool = option(True, help="RMSNorm on the latent (kv_a_layernorm; DeepSeek always applies it)")
    norm_eps: float = option(1e-6, help="epsilon of kv_a_layernorm and q_a_layernorm")
    rope_theta: float = option(10000.0, help="RoPE base: rope dim pair i turns by rope_theta^(-2i/rope_dim)")
    rope_inv_freq: tuple[float, ...] | None = option(None, help="the rope_dim/2 inverse frequencies of the rope "
                                                                "pairs (a conversion's kept frequencies; None: from "
                                                                "rope_theta)")
    rope_interleave: bool = option(False, help="rope dims stored as interleaved pairs (DeepSeek's rope_interleave)")

    def validate(self):
        check_positive_int("dim", self.dim)
        check_positive_int("heads", self.heads)
        self.validate_mla(self.heads)
        for name in ("bias", "q_bias", "causal", "latent_norm", "rope_interleave"):
            check_type(name, getattr(self, name), bool, "True or False")
        check_type("dropout", self.dropout, (int, float), "a float in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: expected a float in [0, 1)")
        for name in ("norm_eps", "rope_theta") + (("scale",) if self.scale is not None else ()):
            check_type(name, getattr(self, name), (int, float), "a positive number")
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number")
        if (self.nope_dim is None or self.v_dim is None) and self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide dim={self.dim}: pass nope_dim and v_dim explicitly")
        if self.rope_inv_freq is not None:
            freqs = tuple(self.rope_inv_freq)
            if len(freqs) != self.rope_dim // 2 or not all(isinstance(f, (int, float)) and f > 0 for f in freqs):
                raise ValueError(f"rope_inv_freq: expected rope_dim/2 = {self.rope_dim // 2} positive numbers, got "
                                 f"{len(freqs)}")
            object.__setattr__(self, "rope_inv_freq", tuple(float(f) for f in freqs))

    @property
    def nope_dim_(self) -> int:
        return self.nope_dim if self.nope_dim is not None else self.dim // self.heads

    @property
    def v_dim_(self) -> int:
        return self.v_dim if self.v_dim is not None else self.dim // self.heads

    @property
    def qk_dim(self) -> int:
        """Per-head query/key width of the expanded form: ``nope_dim + rope_dim``."""
        return self.nope_dim_ + self.rope_dim

    @property
    def scale_(self) -> float:
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(self.qk_dim)

    def kv_layout(self) -> KVLayout:
        """What this layer caches (see :meth:`MLAOptions.mla_layout`)."""
        return self.mla_layout()


class LatentRMSNorm(nn.Module):
    """RMSNorm as Hugging Face's DeepSeek-V3 computes it (float32 statistics, weight applied in the input dtype)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


@register("mla", MLAConfig, converter="attnzoo.patches.mla:mla",
          example={"dim": 32, "heads": 4, "kv_rank": 8, "rope_dim": 4, "nope_dim": 6, "v_dim": 5},
          description="multi-head latent attention (DeepSeek MLA): a latent + RoPE-key cache, absorbed decode")
class MLAAttention(nn.Module):
    """Multi-head latent attention with decoupled RoPE (see the module docstring).

    ``forward(hidden_states, key_padding_mask=..., attn_mask=..., position_ids=..., cache=...,
    position_embeddings=...)``; ``make_cache()`` gives a :class:`~attnzoo.variants.cache.LatentCache`.
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config={type(config).__name__}: expected an MLAConfig")
        self.config = c = config
        self.heads, self.rope_heads = c.heads, c.rope_heads
        self.kv_rank, self.rope_dim, self.nope_dim, self.v_dim = c.kv_rank, c.rope_dim, c.nope_dim_, c.v_dim_
        qk = c.qk_dim
        if c.q_rank is None:
            self.q_proj = nn.Linear(c.dim, c.heads * qk, bias=c.q_bias)
        else:
            self.q_a_proj = nn.Linear(c.dim, c.q_rank, bias=c.bias)
            self.q_a_layernorm = LatentRMSNorm(c.q_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_rank, c.heads * qk, bias=c.q_bias)
        self.kv_a_proj_with_mqa = nn.Linear(c.dim, c.kv_rank + c.rope_heads * c.rope_dim, bias=c.bias)
        self.kv_a_layernorm = LatentRMSNorm(c.kv_rank, c.norm_eps) if c.latent_norm else None
        self.kv_b_proj = nn.Linear(c.kv_rank, c.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(c.heads * self.v_dim, c.dim, bias=c.bias)
        # the frequencies live as float64 numbers, not as a buffer that model.to(bfloat16) would round
        self.rope_inv_freq = c.rope_inv_freq or tuple(c.rope_theta ** (-2 * i / c.rope_dim)
                                                      for i in range(c.rope_dim // 2))
        self._freq_tables: dict = {}

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.heads}, kv_rank={c.kv_rank}, rope_dim={c.rope_dim}, nope_dim={self.nope_dim}, "
                f"v_dim={self.v_dim}, q_rank={c.q_rank}, rope_keys={c.rope_keys}"
                + (f"x{c.kv_heads}" if c.rope_keys == "per_head" else "") + f", causal={c.causal}")

    # ------------------------------------------------------------------ the weights, as the two forms use them
    def kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head: ``w_kb [heads, nope_dim, kv_rank]`` and ``w_vb [heads, v_dim, kv_rank]``
        (views of the weight)."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def project(self, hidden_states: torch.Tensor):
        """``(q_nope [B, H, N, Dn], q_rope [B, H, N, Dr], c [B, N, R], k_rope [B, Rh, N, Dr])`` before RoPE."""
        b, n, _ = hidden_states.shape
        if self.config.q_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, n, self.heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(hidden_states)
        c, k_rope = kv.split([self.kv_rank, self.rope_heads * self.rope_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            c = self.kv_a_layernorm(c)
        k_rope = k_rope.view(b, n, self.rope_heads, self.rope_dim).transpose(1, 2)
        return q_nope, q_rope, c, k_rope

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x [B, heads, N, rope_dim]`` with ``cos``/``sin`` ``[N, rope_dim]`` or ``[B, N, rope_dim]``
        (rotate-half tables, as Hugging Face passes them). Interleaved pairs (``rope_interleave``) come out
        de-interleaved (evens then odds), as DeepSeek-V3 in ``transformers`` does: queries and keys alike."""
        if self.config.rope_interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return apply_rope(x, cos, sin, "half")

    def cos_sin(self, position_ids: torch.Tensor | None, n: int, start: int, device, dtype):
        if position_ids is None:
            position_ids = torch.arange(start, start + n, device=device)
        elif position_ids.shape[-1] != n:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}: expected [{n}] or [batch, {n}]")
        key = (str(device), dtype)
        if key not in self._freq_tables:
            self._freq_tables[key] = torch.tensor(self.rope_inv_freq, dtype=torch.float64, device=device).to(dtype)
        return rope_cos_sin(position_ids.to(dtype), self._freq_tables[key], "half", dtype=dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Cache | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                decode: bool | None = None, causal: bool | None = None) -> torch.Tensor:
        """Attend and project back.

        Args:
            hidden_states: ``[batch, seq, dim]``.
            key_padding_mask: bool ``[batch, k_len]``, True = real token; ``k_len`` counts cached + new tokens.
            attn_mask: bool keep mask broadcastable to ``[batch, heads, seq, k_len]``.
            position_ids: ``[seq]`` or ``[batch, seq]`` RoPE positions (default: continue from the cache).
            cache: a :class:`~attnzoo.variants.cache.LatentCache` (or a view of a ``transformers`` cache with the
                same ``update(latent, rope_key)``) for incremental decoding.
            position_embeddings: ``(cos, sin)`` rotate-half tables ``[.., seq, rope_dim]`` to use instead of the
                module's own frequencies (what a Hugging Face DeepSeek-V3 layer passes).
            decode: run the absorbed form (None: when the cache holds past tokens). A cache whose length the host
                does not know (a static cache: ``cache.seq_len`` None) needs it.
            causal: None: the config's. False where ``attn_mask`` holds the causality itself (a static cache,
                whose keys run past the new tokens to the buffer's end).

        Returns:
            ``[batch, seq, dim]``.
        """
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected [batch, seq, dim]")
        b, n, _ = hidden_states.shape
        c = self.config
        q_nope, q_rope, lat, k_rope = self.project(hidden_states)
        past = cache.seq_len if cache is not None else 0
        if decode is None:
            if past is None:
                raise ValueError("this cache does not tell its length on the host (a static cache): pass decode=")
            decode = past > 0
        causal = c.causal if causal is None else bool(causal)
        if position_embeddings is None:
            if position_ids is None and past is None:
                raise ValueError("this cache does not tell its length on the host (a static cache): pass "
                                 "position_ids or position_embeddings")
            table = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
            cos, sin = self.cos_sin(position_ids, n, past or 0, hidden_states.device, table)
        else:
            cos, sin = position_embeddings
        q_rope, k_rope = self.rotate(q_rope, cos, sin), self.rotate(k_rope, cos, sin)
        k_rope = k_rope.transpose(1, 2)  # [B, N, Rh, Dr]
        if cache is not None:
            lat, k_rope = cache.update(lat, k_rope.reshape(b, n, self.rope_heads * self.rope_dim))
            k_rope = k_rope.view(b, k_rope.shape[1], self.rope_heads, self.rope_dim)
        dropout = c.dropout if self.training else 0.0
        if not decode:
            out = self._expanded(q_nope, q_rope, lat, k_rope, attn_mask, key_padding_mask, dropout, causal)
        else:
            if dropout:
                raise ValueError("mla decodes from a cache without attention dropout: call model.eval() (dropout="
                                 f"{c.dropout})")
            w_kb, w_vb = self.kv_b_weights()
            o_lat = latent_attention(absorb_query(q_nope, w_kb), q_rope, lat, k_rope, scale=c.scale_,
                                     causal=causal, mask=attn_mask, key_padding_mask=key_padding_mask)
            out = absorbed_output(o_lat, w_vb)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))

    def _expanded(self, q_nope, q_rope, lat, k_rope, attn_mask, key_padding_mask, dropout, causal):
        """Prefill/training: per-head keys ``[k_nope; k_rope]`` and values from ``kv_b_proj``, on the dense op."""
        b, s = lat.shape[:2]
        kv = self.kv_b_proj(lat).view(b, s, self.heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        kr = k_rope.transpose(1, 2)
        if self.rope_heads != self.heads:
            kr = kr.repeat_interleave(self.heads // self.rope_heads, dim=1)
        k = torch.cat([k_nope, kr], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attention(q, k, v, causal=causal, mask=attn_mask, key_padding_mask=key_padding_mask,
                         scale=self.config.scale_, dropout_p=dropout)

    def make_cache(self) -> LatentCache:
        """A fresh cache for incremental decoding with this module."""
        return LatentCache()
