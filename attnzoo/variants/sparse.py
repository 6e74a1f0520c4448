"""The sparse family: ``sliding_window``, ``longformer``, ``bigbird``, ``sparse_strided``, ``sparse_fixed``.

One module, :class:`SparseAttention`, a :class:`~attnzoo.variants.dense.DenseAttention` whose
attention runs :func:`attnzoo.ops.sparse_attention` with the config's pattern (same
``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped KV heads, RoPE, caches). Each variant's
config adds its pattern's options to the dense ones.

``window`` counts keys on each side of a query, its own position not counted: query ``i``
sees key ``j`` when ``|i - j| <= window`` (causal: ``0 <= i - j <= window``); ±256 is
``window=256``. Hugging Face's Longformer ``attention_window=512`` is ``window=256``;
BigBird's window is whole blocks (``window`` a multiple of ``block_size``; HF's 3 blocks is
``window=block_size``). See docs/sparse.md.

Sparse variants are self-attention: no ``context`` (cross-attention) and no extra
``attn_mask`` (the pattern is the mask; padding goes through ``key_padding_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check_type
from ..options import option
from ..ops import attention, sparse_attention
from ..ops.sparse import BigBird, Fixed, Longformer, Pattern, SlidingWindow, Strided, compile_layout
from ..registry import register
from .cache import Cache, KVCache
from .dense import DenseAttention, DenseConfig
from .rolling_cache import RollingKVCache

__all__ = ["SlidingWindowOptions", "LongformerOptions", "BigBirdOptions", "SparseConfig", "SlidingWindowConfig", "LongformerConfig", "BigBirdConfig", "SparseStridedConfig",
           "SparseFixedConfig", "SparseAttention"]


@dataclass(frozen=True, kw_only=True)
class SparseConfig(DenseConfig):
    """Dense options (``dim``, ``heads``, ``groups``, ``causal``, ``rope``, ...) plus a pattern's options."""

    pattern_cls = Pattern  # class attributes, not options: the subclass's pattern and its option names
    pattern_options = ()

    def validate(self):
        super().validate()
        if self.context_dim is not None:
            raise ValueError(f"context_dim={self.context_dim}: sparse variants are self-attention patterns; "
                             "use 'mha'/'gqa' for cross-attention")
        self.pattern()  # checks the pattern's options (ValueError naming the option)

    def pattern(self) -> Pattern:
        return self.pattern_cls(causal=self.causal, **{k: getattr(self, k) for k in self.pattern_options})


_WINDOW_HELP = "keys on each side of a query, its own position not counted (causal: keys i-window .. i)"


@dataclass(frozen=True, kw_only=True)
class SlidingWindowOptions:
    """``sliding_window``'s own options (the module config and ``attnzoo.SlidingWindow`` share them)."""

    window: int = option(256, help=_WINDOW_HELP)


@dataclass(frozen=True, kw_only=True)
class SlidingWindowConfig(SlidingWindowOptions, SparseConfig):
    """``sliding_window``: ``window`` keys on each side (causal: the ``window`` previous keys and itself)."""

    pattern_cls = SlidingWindow
    pattern_options = ("window",)

    def kv_layout(self):
        """Causal: the rolling cache keeps the last ``window`` tokens (:class:`~attnzoo.variants.RollingKVCache`)."""
        layout = super().kv_layout()
        return layout.with_window(self.window) if self.causal else layout


def _global_tokens(text: str):
    """``--global-tokens 1`` (the first token) or ``--global-tokens 0,511`` (positions)."""
    try:
        return int(text) if "," not in text else [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--global-tokens {text!r}: expected a count (e.g. 1) or comma-separated positions "
                         "(e.g. 0,511)") from None


@dataclass(frozen=True, kw_only=True)
class LongformerOptions:
    """``longformer``'s own options."""

    window: int = option(256, help=_WINDOW_HELP)
    global_tokens: int | tuple[int, ...] = option(1, help="global tokens: the first N, or a list of positions",
                                                  parse=_global_tokens, metavar="N|P,P,...")
    global_projections: bool = option(False, help="separate q/k/v projections for the global tokens, initialised "
                                                  "as copies")


@dataclass(frozen=True, kw_only=True)
class LongformerConfig(LongformerOptions, SparseConfig):
    """``longformer``: a sliding ``window`` plus ``global_tokens`` (an int: the first N tokens; or positions).

    ``global_projections=True`` gives the global tokens their own ``q_global_proj``,
    ``k_global_proj``, ``v_global_proj`` as in the paper (Hugging Face's ``query_global``,
    ``key_global``, ``value_global``): a global token's query and the keys/values it reads come
    from them; every other query reads the global tokens through the ordinary projections.

    Args:
        window: keys on each side of a query, its own position not counted.
        global_tokens: an int N (the first N tokens are global) or a tuple of global positions.
        global_projections: separate q/k/v projections for the global tokens.
    """

    pattern_cls = Longformer
    pattern_options = ("window", "global_tokens")

    def validate(self):
        check_type("global_projections", self.global_projections, bool, "True or False")
        super().validate()
        object.__setattr__(self, "global_tokens", self.pattern().global_tokens)  # lists -> tuples (hashable)


@dataclass(frozen=True, kw_only=True)
class BigBirdOptions:
    """``bigbird``'s own options."""

    block_size: int = option(64, help="tokens per block")
    window: int | None = option(None, help="keys on each side in whole blocks (None: block_size, 3 blocks)")
    global_blocks: int = option(2, help="global blocks")
    random_blocks: int = option(3, help="random key blocks per query block")
    seed: int = option(0, help="seed of the random blocks (the same in training and evaluation)")


@dataclass(frozen=True, kw_only=True)
class BigBirdConfig(BigBirdOptions, SparseConfig):
    """``bigbird``: blocks of ``block_size``; a ``window`` of whole blocks (default ``block_size``: 3 blocks),
    ``global_blocks`` global blocks and ``random_blocks`` random key blocks per query block, drawn from
    ``seed`` (the same in training and evaluation).

    Args:
        block_size: tokens per block.
        window: keys on each side of a query, in tokens, a multiple of ``block_size`` (None: ``block_size``).
        global_blocks: global blocks (attend everywhere, attended by all).
        random_blocks: random key blocks per query block.
        seed: seed of the random blocks.
    """

    pattern_cls = BigBird
    pattern_options = ("block_size", "window", "global_blocks", "random_blocks", "seed")

    def validate(self):
        super().validate()
        object.__setattr__(self, "window", self.pattern().window)


@dataclass(frozen=True, kw_only=True)
class SparseStridedConfig(SparseConfig):
    """``sparse_strided``: the previous ``stride`` positions and every ``stride``-th one (Sparse Transformer).

    Args:
        stride: a query reads the keys with |i - j| < stride and every stride-th key (i - j a multiple of it).
    """

    stride: int = option(128, help="the previous stride positions and every stride-th one")
    pattern_cls = Strided
    pattern_options = ("stride",)


@dataclass(frozen=True, kw_only=True)
class SparseFixedConfig(SparseConfig):
    """``sparse_fixed``: the query's block of ``stride`` positions and the last ``summary`` of every block.

    Args:
        stride: block length.
        summary: positions at the end of every block that every query reads (causal: the earlier blocks').
    """

    stride: int = option(128, help="block length")
    summary: int = option(8, help="the last positions of every block that every later query sees")
    pattern_cls = Fixed
    pattern_options = ("stride", "summary")


_EX = {"dim": 64, "heads": 4}


@register("sliding_window", SlidingWindowConfig, converter="attnzoo.patches.sliding_window:sliding_window", example={**_EX, "window": 3},
          description="sliding-window attention: `window` keys on each side (rolling KV cache when causal)")
@register("longformer", LongformerConfig, converter="attnzoo.patches.longformer:longformer", example={**_EX, "window": 1, "global_tokens": (0, 3)},
          description="Longformer: sliding window + global tokens (optionally their own projections)")
@register("bigbird", BigBirdConfig, converter="attnzoo.patches.bigbird:bigbird", example={**_EX, "block_size": 1, "window": 1, "random_blocks": 1},
          description="BigBird: block window + global blocks + seeded random blocks")
@register("sparse_strided", SparseStridedConfig, example={**_EX, "stride": 3},
          description="Sparse Transformer, strided: previous `stride` positions + every `stride`-th")
@register("sparse_fixed", SparseFixedConfig, example={**_EX, "stride": 4, "summary": 1},
          description="Sparse Transformer, fixed: own block of `stride` + last `summary` of each block")
class SparseAttention(DenseAttention):
    """Attention restricted to a sparse pattern (sliding window, Longformer, BigBird, Sparse Transformer).

    Parameters as :class:`DenseAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), plus
    ``q_global_proj``/``k_global_proj``/``v_global_proj`` for Longformer with ``global_projections``.
    The pattern is ``self.pattern`` (:mod:`attnzoo.ops.sparse.patterns`).
    """

    def __init__(self, config: SparseConfig):
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config={type(config).__name__}: expected a SparseConfig (e.g. SlidingWindowConfig)")
        super().__init__(config)
        self.pattern = config.pattern()
        self.global_projections = bool(getattr(config, "global_projections", False))
        if self.global_projections:
            c, hd = config, self.head_dim
            self.q_global_proj = nn.Linear(c.dim, c.heads * hd, bias=c.bias)
            self.k_global_proj = nn.Linear(c.dim, c.kv_heads * hd, bias=c.bias)
            self.v_global_proj = nn.Linear(c.dim, c.kv_heads * hd, bias=c.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern.describe()}"

    def make_cache(self) -> Cache:
        """:class:`RollingKVCache` for a causal sliding window (constant memory), else :class:`KVCache`."""
        if type(self.pattern) is SlidingWindow and self.pattern.causal:
            return RollingKVCache(self.pattern.window)
        return KVCache()

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        """``[batch, seq, dim] -> [batch, seq, dim]``; arguments as :meth:`DenseAttention.forward` except that
        ``context`` and ``attn_mask`` are not taken (see the module docstring)."""
        if context is not None:
            raise ValueError(f"{self.pattern.name} is a self-attention pattern: context (cross-attention) is not "
                             "supported; use 'mha'/'gqa' for cross-attention")
        if attn_mask is not None:
            raise ValueError(f"{self.pattern.name}: attn_mask is not supported, the pattern is the mask; pass "
                             "padding as key_padding_mask [batch, k_len]")
        if isinstance(cache, RollingKVCache):
            if type(self.pattern) is not SlidingWindow or not self.pattern.causal:
                raise ValueError(f"RollingKVCache serves causal sliding_window only, this module is "
                                 f"{self.pattern.describe()}; use KVCache (module.make_cache())")
            if cache.window < self.pattern.window:
                raise ValueError(f"RollingKVCache(window={cache.window}) keeps fewer keys than this module's "
                                 f"window={self.pattern.window}; use module.make_cache()")
        if self.global_projections and cache is not None:
            raise ValueError("longformer with global_projections=True does not decode with a cache (global tokens "
                             "would need a second cache of global keys); build it with global_projections=False")
        return super().forward(hidden_states, key_padding_mask=key_padding_mask, position_ids=position_ids,
                               cache=cache)

    def _attend(self, q, k, v, *, causal, attn_mask, key_padding_mask, cache, hidden_states):
        if key_padding_mask is not None and key_padding_mask.shape[-1] != k.shape[2]:
            if isinstance(cache, RollingKVCache) and key_padding_mask.shape[-1] == cache.seq_len:
                key_padding_mask = key_padding_mask[:, -k.shape[2]:]  # the kept keys are the last ones
        dropout = self.config.dropout if self.training else 0.0
        out = sparse_attention(q, k, v, self.pattern, key_padding_mask=key_padding_mask, dropout_p=dropout,
                               global_rows=not self.global_projections)
        if self.global_projections:
            out = self._global_rows(out, hidden_states, key_padding_mask, dropout)
        return out

    def _global_rows(self, out, x, key_padding_mask, dropout, pattern=None):
        """Longformer's global rows through their own projections (dense over every key); ``pattern``:
        the module's pattern (default) or the one a caller fitted to this length."""
        b, n, _ = x.shape
        pattern = self.pattern if pattern is None else pattern
        rows = compile_layout(pattern, n, device=x.device).global_rows  # cached, already on the device
        if rows.numel() == 0:
            return out
        hd = self.head_dim
        q = self.q_global_proj(x.index_select(1, rows)).view(b, len(rows), self.heads, hd).transpose(1, 2)
        k = self.k_global_proj(x).view(b, n, self.kv_heads, hd).transpose(1, 2)
        v = self.v_global_proj(x).view(b, n, self.kv_heads, hd).transpose(1, 2)
        mask = None
        if pattern.causal:
            mask = (torch.arange(n, device=x.device)[None, :] <= rows[:, None])[None, None]
        g = attention(q, k, v, mask=mask, key_padding_mask=key_padding_mask, dropout_p=dropout)
        return out.index_copy(2, rows, g)
