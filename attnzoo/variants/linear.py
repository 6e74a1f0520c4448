"""The linear family: ``performer`` (FAVOR+), ``linformer`` and ``linear`` (learned feature maps, optionally
hybrid with an exact-softmax window).

Every module is a :class:`~attnzoo.variants.dense.DenseAttention` (same ``q_proj``/``k_proj``/``v_proj``/
``o_proj``, grouped KV heads, RoPE) whose attention is replaced:

* ``performer``: ``phi(q) . phi(k)`` with FAVOR+ positive orthogonal random features (``features`` of them,
  drawn from ``seed``; buffer ``projection``), causal or not; ``redraw`` > 0 draws new features every
  ``redraw`` training forwards (draw ``r`` from ``(seed, r)``: a run repeats exactly);
* ``linear``: a learnable map per head (``q_feature_map``, ``k_feature_map``: :class:`~attnzoo.variants.
  feature_maps.FeatureMap`), ``feature_map`` = hedgehog | t2r | performer | elu; ``window`` > 0 (causal):
  exact softmax over the last ``window`` keys, linear attention beyond, one shared normaliser (LoLCATs'
  hybrid);
* ``linformer``: keys and values projected along the sequence to ``k`` slots (``k_seq_proj`` ``[*, k,
  max_len]``, ``v_seq_proj`` unless ``share_kv``), then softmax attention over the slots. Padding keys are
  zeroed before the projection: they never enter a slot, and appending padding changes nothing. Encoders
  only (``causal=True`` is refused: a slot mixes every position, the future included).

Causal ``performer`` and ``linear`` decode with a fixed-size state (:class:`LinearStateCache`: per KV head
``sum phi(k) [v | 1]^T`` and its log-scale, plus the window's last keys/values), whatever the length.
Dropout is not applied (no attention probabilities are formed), except on Linformer's slot probabilities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import check_choice, check_positive_int, check_type
from ..kv import KVLayout
from ..ops import apply_rope, attention, rope_cos_sin
from ..ops.linear import LinearState, linear_attention
from ..ops.linear.favor import exp_map_attention, exp_map_fits, favor_map
from ..registry import register
from ..options import option
from .cache import Cache, StateCache
from .dense import DenseAttention, DenseConfig
from .feature_maps import FEATURE_MAPS, FeatureMap, favor_features, feature_dim, orthogonal_gaussian

__all__ = ["PerformerOptions", "LinearOptions", "LinformerOptions", "LinearFamilyConfig", "PerformerConfig",
           "LinearConfig", "LinformerConfig", "LinearAttention", "LinformerAttention", "LinearStateCache"]


@dataclass(frozen=True, kw_only=True)
class PerformerOptions:
    """``performer``'s own options (the module config and ``attnzoo.Performer`` share them)."""

    features: int = option(256, help="random features m (FAVOR+); the error against softmax falls as m grows")
    seed: int = option(0, help="seed of the random features (draw r of a redraw uses (seed, r))")
    redraw: int = option(0, help="draw new random features every N training forwards (0: never)")


@dataclass(frozen=True, kw_only=True)
class LinearOptions:
    """``linear``'s own options."""

    feature_map: str = option("hedgehog", help="learnable feature map: " + " | ".join(FEATURE_MAPS))
    window: int = option(0, help="exact softmax over the last N keys, linear attention beyond, one shared "
                                 "normaliser (causal; 0: linear only)")
    features: int = option(64, help="feature_map='performer': its number of features")
    seed: int = option(0, help="feature_map='performer': seed of its initial projection")


@dataclass(frozen=True, kw_only=True)
class LinformerOptions:
    """``linformer``'s own options."""

    k: int = option(256, help="projected length: keys and values are projected to k slots")
    max_len: int | None = option(None, help="longest sequence, the projections are k x max_len (None: 4096, or the "
                                            "model's max_position_embeddings when converting)")
    per_head: bool = option(False, help="a projection per KV head (default: one shared by every head)")
    share_kv: bool = option(False, help="the same projection for keys and values")


@dataclass(frozen=True, kw_only=True)
class LinearFamilyConfig(DenseConfig):
    """Dense options plus ``scale`` (of the scores the maps approximate)."""

    scale: float | None = option(None, help="score scale of the softmax the attention stands for (None: "
                                            "1/sqrt(head_dim))")

    def validate(self):
        super().validate()
        if self.scale is not None:
            check_type("scale", self.scale, (int, float), "a positive number or None")
            if self.scale <= 0:
                raise ValueError(f"scale={self.scale!r}: expected a positive number or None")
        if self.context_dim is not None:
            raise ValueError(f"context_dim={self.context_dim}: the linear family is self-attention; use "
                             "'mha'/'gqa' for cross-attention")

    @property
    def scale_(self) -> float:
        return self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim_)

    def kv_layout(self) -> KVLayout:
        """A fixed state per KV head (``feature_width()``: the subclass's feature rows): ``features x (head_dim + 1)`` (``sum phi(k) [v | 1]^T``) and one log-scale."""
        return KVLayout(state=self.kv_heads * (self.feature_width() * (self.head_dim_ + 1) + 1))


@dataclass(frozen=True, kw_only=True)
class PerformerConfig(PerformerOptions, LinearFamilyConfig):
    """``performer``: FAVOR+ positive orthogonal random features.

    Args:
        features: random features m.
        seed: seed of the features.
        redraw: draw new features every N training forwards (0: never).
    """

    def validate(self):
        super().validate()
        check_positive_int("features", self.features)
        check_type("seed", self.seed, int, "an int")
        check_positive_int("redraw", self.redraw, minimum=0)

    def feature_width(self) -> int:
        return self.features


@dataclass(frozen=True, kw_only=True)
class LinearConfig(LinearOptions, LinearFamilyConfig):
    """``linear``: a learnable feature map per head, optionally with an exact-softmax window.

    Args:
        feature_map: hedgehog | t2r | performer | elu.
        window: exact softmax over the last ``window`` keys (causal; 0: none).
        features: the performer map's number of features.
        seed: the performer map's initial projection.
    """

    def validate(self):
        super().validate()
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        check_positive_int("window", self.window, minimum=0)
        check_positive_int("features", self.features)
        check_type("seed", self.seed, int, "an int")
        if self.window and not self.causal:
            raise ValueError(f"window={self.window}: the softmax window is the last `window` keys of a causal "
                             "layer; set causal=True or window=0")

    def feature_width(self) -> int:
        return feature_dim(self.feature_map, self.head_dim_, self.features)

    def kv_layout(self) -> KVLayout:
        """The state, plus the window's keys and values (the last ``window`` tokens)."""
        lay = super().kv_layout()
        if not self.window:
            return lay
        return KVLayout(kv_heads=self.kv_heads, head_dim=self.head_dim_, state=lay.state, window=self.window)


_LINFORMER_CAUSAL = ("linformer is for encoders: each of its k slots is a mix of every position, the future "
                     "included, so it has no causal form; for decoders use 'linear' or 'performer'")


@dataclass(frozen=True, kw_only=True)
class LinformerConfig(LinformerOptions, LinearFamilyConfig):
    """``linformer``: keys and values projected to ``k`` slots along the sequence (encoders only).

    Args:
        k: projected length.
        max_len: longest sequence.
        per_head: a projection per KV head (default: one for every head).
        share_kv: the same projection for keys and values.
    """

    encoder_only: ClassVar[bool] = True  # causal=True is refused (see validate)

    def validate(self):
        super().validate()
        if self.causal:
            raise ValueError(f"causal={self.causal!r}: {_LINFORMER_CAUSAL}")
        check_positive_int("k", self.k)
        check_positive_int("max_len", self.max_len, allow_none=True)
        check_type("per_head", self.per_head, bool, "True or False")
        check_type("share_kv", self.share_kv, bool, "True or False")
        if self.k > self.max_len_:
            raise ValueError(f"k={self.k}: more slots than max_len={self.max_len_} positions; expected k <= max_len")

    @property
    def max_len_(self) -> int:
        return self.max_len if self.max_len is not None else 4096

    def kv_layout(self) -> KVLayout:
        """Nothing: an encoder layer does not decode."""
        return KVLayout()


class LinearStateCache(StateCache):
    """The state of a causal linear layer: ``(kv, m)`` of :class:`~attnzoo.ops.linear.LinearState`, plus for a
    ``window`` the last ``window`` keys, values and whether each is a real token (``[batch, kv_heads, window,
    head_dim]`` twice and ``[batch, window]``). Sizes are fixed: memory does not grow with the sequence."""

    def __init__(self, window: int = 0):
        self.window = window
        super().__init__()

    def layout(self) -> KVLayout:
        if self._state is None:
            return KVLayout()
        kv, m = self._state[:2]
        state = (kv[0].numel() + m[0].numel())
        if not self.window:
            return KVLayout(state=state)
        k = self._state[2]
        return KVLayout(kv_heads=k.shape[1], head_dim=k.shape[3], state=state, window=self.window)


class LinearAttention(DenseAttention):
    """``performer`` and ``linear``: attention through feature maps (see the module docstring).

    Parameters as :class:`DenseAttention` (``q_proj``...``o_proj``), plus ``q_feature_map``/``k_feature_map``
    (``linear``) or the buffer ``projection`` (``performer``).
    """

    def __init__(self, config: LinearFamilyConfig):
        if not isinstance(config, (PerformerConfig, LinearConfig)):
            raise TypeError(f"config={type(config).__name__}: expected a PerformerConfig or a LinearConfig")
        super().__init__(config)
        c = config
        self.window = getattr(c, "window", 0)
        self.scale = c.scale_
        if isinstance(c, PerformerConfig):
            self.register_buffer("projection", orthogonal_gaussian(c.features, self.head_dim, c.seed))
            self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # training forwards so far
            self.q_feature_map = self.k_feature_map = None
        else:
            self.projection = None
            kw = dict(features=c.features, scale=self.scale, seed=c.seed)
            self.q_feature_map = FeatureMap(c.feature_map, self.heads, self.head_dim, **kw)
            self.k_feature_map = FeatureMap(c.feature_map, self.kv_heads, self.head_dim, gain=bool(self.window), **kw)
        self.transfer = False  # attention transfer (attnzoo.uptrain.transfer): see forward
        self.transfer_loss = None

    def extra_repr(self) -> str:
        c = self.config
        what = f"performer m={c.features}" if self.projection is not None else f"feature_map={c.feature_map}"
        return f"{super().extra_repr()}, {what}" + (f", window={self.window}" if self.window else "")

    def make_cache(self) -> Cache:
        """A :class:`LinearStateCache` (causal only: a non-causal layer does not decode)."""
        if not self.config.causal:
            raise ValueError("this module is not causal: a non-causal layer reads every key and does not decode "
                             "with a cache")
        return LinearStateCache(self.window)

    # ------------------------------------------------------------------ features
    def _maybe_redraw(self) -> None:
        c = self.config
        if self.projection is None or not self.training or not c.redraw:
            return
        if int(self.draws) % c.redraw == 0:
            rows = orthogonal_gaussian(c.features, self.head_dim, c.seed, int(self.draws) // c.redraw)
            self.projection.copy_(rows)
        self.draws += 1

    def features(self, q: torch.Tensor, k: torch.Tensor):
        """``(qf, q_log, kf, k_log)`` for projected heads (see :mod:`attnzoo.variants.feature_maps`)."""
        qf, ql = favor_features(q, self.projection, self.scale) if self.projection is not None else \
            self.q_feature_map(q)
        return (qf, ql, *self.key_features(k))

    def exp_maps(self):
        """``(q_map, k_map)`` as :class:`attnzoo.ops.linear.favor.ExpMap` when both maps are exponential
        (FAVOR+, the performer and hedgehog maps), else None."""
        if self.projection is not None:
            mp = favor_map(self.projection, self.scale)
            return mp, mp
        qm, km = self.q_feature_map.exp_map(), self.k_feature_map.exp_map()
        return (qm, km) if qm is not None and km is not None else None

    def key_features(self, k: torch.Tensor):
        """``(kf, k_log)`` of projected keys."""
        return favor_features(k, self.projection, self.scale) if self.projection is not None else \
            self.k_feature_map(k)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``[batch, seq, dim] -> [batch, seq, dim]``. ``key_padding_mask``: bool ``[batch, k_len]`` (with a
        cache, ``k_len`` counts cached and new tokens; the last ``seq`` columns are read). ``position_embeddings``:
        a Hugging Face model's ``(cos, sin)`` (rotate-half), used instead of this module's RoPE.
        ``cache``: a :class:`LinearStateCache` (``make_cache()``). No ``context``, no ``attn_mask``."""
        if context is not None:
            raise ValueError("the linear family is self-attention: context (cross-attention) is not supported")
        if attn_mask is not None:
            raise ValueError("linear attention takes no attn_mask (its causality is the `causal` option); pass "
                             "padding as key_padding_mask [batch, k_len]")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected [batch, seq, dim]")
        if cache is not None and not isinstance(cache, StateCache):
            raise ValueError(f"{type(cache).__name__}: linear attention keeps a state, not keys; use "
                             "module.make_cache()")
        b, n, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, position_ids, cache, position_embeddings)
        valid = key_padding_mask[:, -n:].bool() if key_padding_mask is not None else None
        out = self.attend_heads(q, k, v, valid, cache)
        if self.transfer:
            out = self._transfer(q, k, v, valid, out)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def _project(self, x, position_ids, cache, position_embeddings):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self._kv(x, b)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        elif self.inv_freq is not None:
            start = cache.seq_len if cache is not None else 0
            pos = self._positions(position_ids, n, start, x.device)
            cos, sin = rope_cos_sin(pos, self.inv_freq, self.config.rope.style)
            q, k = apply_rope(q, cos, sin, self.config.rope.style), apply_rope(k, cos, sin, self.config.rope.style)
        return q, k, v

    def attend_heads(self, q, k, v, valid, cache=None) -> torch.Tensor:
        """Per-head outputs ``[batch, heads, seq, head_dim]`` (before ``o_proj``) of projected heads."""
        self._maybe_redraw()
        causal, W = self.config.causal, self.window
        if cache is None:
            maps = self.exp_maps() if not causal else None
            if maps is not None and exp_map_fits(q, v, *maps):  # the feature maps fused into the two GEMMs
                return exp_map_attention(q, k, v, *maps, key_padding_mask=valid)
            qf, ql, kf, kl = self.features(q, k)
            return linear_attention(qf, kf, v, causal=causal, key_padding_mask=valid, q_log=ql, k_log=kl, window=W,
                                    q=q, k=k, scale=self.scale)
        if not causal:
            raise ValueError("this module is not causal: a non-causal layer does not decode with a cache")
        b, n = q.shape[0], q.shape[2]
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
        if n == 1 and cache.state() is not None:
            return self._step(q, k, v, valid, cache)
        st = cache.state()
        init = LinearState(st[0], st[1]) if st is not None else None
        if not W:
            qf, ql, kf, kl = self.features(q, k)
            out, new = linear_attention(qf, kf, v, causal=True, key_padding_mask=valid, q_log=ql, k_log=kl,
                                        initial_state=init, return_state=True)
            cache.advance((new.kv, new.m), n)
            return out
        if st is None:  # an empty window: W invalid slots
            kb = k.new_zeros(b, self.kv_heads, W, self.head_dim)
            vb = v.new_zeros(b, self.kv_heads, W, self.head_dim)
            ok = torch.zeros(b, W, dtype=torch.bool, device=q.device)
        else:
            kb, vb, ok = st[2].to(k.dtype), st[3].to(v.dtype), st[4]
        k2, v2, ok2 = torch.cat([kb, k], 2), torch.cat([vb, v], 2), torch.cat([ok, valid], 1)
        q2 = torch.cat([q.new_zeros(b, self.heads, W, self.head_dim), q], 2)
        qf, ql, kf, kl = self.features(q2, k2)
        out, new = linear_attention(qf, kf, v2, causal=True, key_padding_mask=ok2, q_log=ql, k_log=kl, window=W,
                                    q=q2, k=k2, scale=self.scale, initial_state=init, return_state=True)
        cache.advance((new.kv, new.m, k2[:, :, -W:], v2[:, :, -W:], ok2[:, -W:]), n)
        return out[:, :, W:]

    def _step(self, q, k, v, valid, cache) -> torch.Tensor:
        """One decoding step from a state (the op's recurrence written out for one token: a few small products
        instead of the chunked form). The token leaving the window (or, without one, the new token) enters the
        state at the running maximum of the keys' log-scales; the query reads the state and the window."""
        from ..ops.linear.chunked import combine_parts

        W, st = self.window, cache.state()
        S, m = st[0], st[1]
        ct = S.dtype
        b, hkv, g = q.shape[0], self.kv_heads, self.heads // self.kv_heads
        if W:
            kb, vb, ok = st[2].to(k.dtype), st[3].to(v.dtype), st[4]
            k_in, v_in, ok_in = kb[:, :, :1], vb[:, :, :1], ok[:, :1]
        else:
            k_in, v_in, ok_in = k, v, valid
        qf, ql = favor_features(q, self.projection, self.scale) if self.projection is not None else \
            self.q_feature_map(q)
        kf, kl = self.key_features(k_in)
        r = (kl[..., 0].to(ct) if kl is not None else torch.zeros(b, hkv, dtype=ct, device=q.device))
        r = r.masked_fill(~ok_in.bool()[:, None, :1].expand(b, hkv, 1)[..., 0], float("-inf"))
        seen = S[..., -1].abs().sum(-1) > 0  # any key in the state
        m_new = torch.where(seen, torch.maximum(m, r), torch.where(torch.isinf(r), m, r))
        w = (r - m_new).exp()  # 0 for a padding token
        S = S * (m - m_new).exp()[..., None, None] + torch.einsum(
            "bhf,bhe->bhfe", kf[:, :, 0].to(ct) * w[..., None],
            torch.cat([v_in[:, :, 0].to(ct), torch.ones(b, hkv, 1, dtype=ct, device=q.device)], -1))
        out = torch.einsum("bhgf,bhfe->bhge", qf[:, :, 0].to(ct).view(b, hkv, g, -1), S).reshape(b, self.heads, 1, -1)
        num, den = out[..., :-1], out[..., -1]
        if W:
            kb2, vb2, ok2 = torch.cat([kb[:, :, 1:], k], 2), torch.cat([vb[:, :, 1:], v], 2), \
                torch.cat([ok[:, 1:], valid], 1)
            L = (m_new.repeat_interleave(g, 1) + (ql[..., 0].to(ct) if ql is not None else 0.0))[..., None]
            L = L.masked_fill(~(S[..., -1].abs().sum(-1) > 0).repeat_interleave(g, 1)[..., None], float("-inf"))
            s = torch.einsum("bhgd,bhjd->bhgj", q[:, :, 0].to(ct).view(b, hkv, g, -1), kb2.to(ct)) * self.scale
            s = s.masked_fill(~ok2[:, None, None, :], float("-inf")).reshape(b, self.heads, 1, W)
            M = s.amax(-1)
            p = (s - M.masked_fill(torch.isinf(M), 0.0)[..., None]).exp()
            num_w = torch.einsum("bhgj,bhje->bhge", p.view(b, hkv, g, W), vb2.to(ct)).reshape(b, self.heads, 1, -1)
            outv = combine_parts([(num, den, L), (num_w, p.sum(-1), M)])
            cache.advance((S, m_new, kb2, vb2, ok2), 1)
        else:
            safe = torch.where(den > 0, den, torch.ones_like(den))
            outv = torch.where((den > 0)[..., None], num / safe[..., None], torch.zeros_like(num))
            cache.advance((S, m_new), 1)
        return outv.to(v.dtype)

    def softmax_heads(self, q, k, v, valid) -> torch.Tensor:
        """The softmax attention these heads stand for (the attention-transfer teacher), same layout."""
        return attention(q, k, v, causal=self.config.causal, key_padding_mask=valid, scale=self.scale)

    def _transfer(self, q, k, v, valid, out):
        """Attention transfer: keep the MSE between these heads' outputs and the softmax teacher's (on the same
        inputs) in ``transfer_loss`` and pass the teacher's on (teacher-forced, layer by layer)."""
        with torch.no_grad():
            teacher = self.softmax_heads(q.detach(), k.detach(), v.detach(), valid)
        diff = (out.float() - teacher.float()) ** 2
        if valid is not None:
            keep = valid[:, None, :, None].to(diff.dtype)
            self.transfer_loss = (diff * keep).sum() / (keep.sum() * diff.shape[1] * diff.shape[-1]).clamp_min(1)
        else:
            self.transfer_loss = diff.mean()
        return teacher.to(out.dtype)


class LinformerAttention(DenseAttention):
    """``linformer``: keys and values projected to ``k`` slots along the sequence, softmax over the slots.

    Parameters as :class:`DenseAttention`, plus ``k_seq_proj`` ``[1 | kv_heads, k, max_len]`` and ``v_seq_proj``
    (absent with ``share_kv``).
    """

    def __init__(self, config: LinformerConfig):
        if not isinstance(config, LinformerConfig):
            raise TypeError(f"config={type(config).__name__}: expected a LinformerConfig")
        super().__init__(config)
        c = config
        hp = c.kv_heads if c.per_head else 1
        self.max_len = c.max_len_
        self.k_seq_proj = nn.Parameter(torch.randn(hp, c.k, self.max_len) / math.sqrt(c.k))
        self.v_seq_proj = None if c.share_kv else nn.Parameter(torch.randn(hp, c.k, self.max_len) / math.sqrt(c.k))
        self.scale = c.scale_

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, k={c.k}, max_len={self.max_len}"

    def make_cache(self) -> Cache:
        raise ValueError(_LINFORMER_CAUSAL)

    def share_projections_with(self, other: LinformerAttention) -> None:
        """Read ``other``'s projections instead of this module's own (dropped): layer-wise sharing. ``other``
        keeps the parameters (saved once, in its layer); this module holds a plain reference to it."""
        if other is self:
            return
        shape = tuple(other.k_seq_proj.shape)
        if shape != tuple(self.k_seq_proj.shape):
            raise ValueError(f"share_layers: projections of shape {shape} and {tuple(self.k_seq_proj.shape)} differ")
        self.k_seq_proj = None
        self.v_seq_proj = None
        self.__dict__["_projections_of"] = other  # not a submodule: the parameters stay where they are

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, F)``: the key and value projections ``[1 | kv_heads, k, max_len]`` (``F is E`` with share_kv)."""
        src = self.__dict__.get("_projections_of", self)
        return src.k_seq_proj, (src.k_seq_proj if src.v_seq_proj is None else src.v_seq_proj)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        """``[batch, seq, dim] -> [batch, seq, dim]``; ``key_padding_mask`` bool ``[batch, seq]``. No context,
        attn_mask or cache (an encoder layer)."""
        if context is not None or attn_mask is not None or cache is not None:
            raise ValueError("linformer takes hidden_states and key_padding_mask only (no context, attn_mask or "
                             "cache: an encoder layer)")
        return super().forward(hidden_states, key_padding_mask=key_padding_mask, position_ids=position_ids)

    def _attend(self, q, k, v, *, causal, attn_mask, key_padding_mask, cache, hidden_states):
        return self.attend_heads(q, k, v, key_padding_mask)

    def attend_heads(self, q, k, v, valid, cache=None) -> torch.Tensor:
        n, c = k.shape[2], self.config
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens: linformer was built with max_len={self.max_len}; rebuild it "
                             f"(or convert) with max_len >= {n}")
        e_all, f_all = self.projections()
        e = e_all[..., :n].to(k.dtype)
        f = e if f_all is e_all else f_all[..., :n].to(v.dtype)
        ks, vs = self._project_seq(e, k, valid), self._project_seq(f, v, valid)
        return attention(q, ks, vs, scale=self.scale, dropout_p=c.dropout if self.training else 0.0)

    @staticmethod
    def _project_seq(e: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``e [1 | h, k, n]`` applied along the sequence of ``x [b, h, n, d]`` (pad rows zeroed first):
        ``[b, h, k, d]``. Shared across heads, one GEMM over every head's columns (``x`` as ``[b, n, h d]``, a
        view when it comes from a projection), so the backward's ``dE`` is one GEMM too, not a per-head
        product summed over the heads."""
        b, h, n, d = x.shape
        if e.shape[0] != 1:
            if valid is not None:
                x = x * valid[:, None, :, None].to(x.dtype)
            return torch.einsum("hsn,bhnd->bhsd", e, x)
        cols = x.transpose(1, 2).reshape(b, n, h * d)
        if valid is not None:
            cols = cols * valid[:, :, None].to(x.dtype)
        return torch.matmul(e[0], cols).view(b, -1, h, d).transpose(1, 2)

    def softmax_heads(self, q, k, v, valid) -> torch.Tensor:
        return attention(q, k, v, key_padding_mask=valid, scale=self.scale)


_EX = {"dim": 64, "heads": 4}


register("performer", PerformerConfig, converter="attnzoo.patches.linear:performer",
         example={**_EX, "features": 16},
         description="Performer: FAVOR+ positive orthogonal random features (state cache when causal)")(LinearAttention)
register("linear", LinearConfig, converter="attnzoo.patches.linear:linear",
         example={**_EX, "feature_map": "hedgehog"},
         description="linear attention with a learned feature map (hedgehog|t2r|performer|elu), optional "
                     "softmax window")(LinearAttention)
register("linformer", LinformerConfig, converter="attnzoo.patches.linear:linformer",
         example={**_EX, "k": 4, "max_len": 16},
         description="Linformer: keys/values projected to k slots along the sequence (encoders)")(LinformerAttention)
