"""MLA behind a Hugging Face decoder layer: :class:`HFMLAAttention`, the latent cache inside ``transformers``' cache
objects (:class:`HFLatentCacheView`), and :func:`absorb_deepseek_attention`, which gives native DeepSeek-V3
checkpoints attnzoo's absorbed decode (:func:`patch_deepseek`: the same as ``attnzoo.patch(model, "mla")``, through
the converter's ``patch_own``).

**Where the latent lives in ``generate()``.** A ``transformers`` cache layer holds a keys and a values tensor per
layer, concatenated along the sequence (dim -2). :class:`HFLatentCacheView` stores the latent ``c`` as the keys
``[batch, 1, seq, kv_rank]`` and the rope keys as the values ``[batch, 1, seq, rope_keys * rope_dim]``: the layout
``DeepseekV3Attention`` itself uses (transformers >= 5.15), so a cache filled by either module is read by the
other, and the cache holds ``kv_rank + rope_keys * rope_dim`` numbers per token and layer, nothing more. A
sliding-window cache layer (a converted Mistral's) keeps its window of latents, as it would keep keys and values;
its mask says which of them a query sees.

**RoPE**, three ways:

* ``layer_rope=True`` (a DeepSeek-V3 layer): the layer's ``position_embeddings`` (cos/sin of ``rope_dim`` columns,
  YaRN's attention factor included) as they come;
* ``rope_pairs=[i, ...]`` (a converted Llama, Mistral, Qwen... whose rope dims are a subset of the source's
  rotary pairs): those pairs' columns of the layer's rotate-half tables (``i`` and ``i + rotary_dim/2``), so the
  converted model turns its rope keys exactly as the source did, whatever the source's RoPE scaling;
* neither: the module's own frequencies (``rope_inv_freq`` / ``rope_theta`` of its config) at the layer's
  ``position_ids``.

**Masks.** The layer's ``attention_mask`` (additive float or boolean 4-d, or a 2-d padding mask) becomes attnzoo
keep masks (:func:`~attnzoo.patches.hf.wrapper.hf_mask_to_keep`); a decode step's ``[batch, 1, 1, k_len]`` mask is
key padding for the split-KV kernel.
"""
from __future__ import annotations

import torch

from ...hf_compat import layer_cache
from ...kv import KVLayout
from ...variants.mla import MLAAttention, MLAConfig
from .wrapper import HFCacheView, hf_mask_to_keep, module_masks

__all__ = ["HFLatentCacheView", "HFMLAAttention", "mla_config_of_deepseek", "absorb_deepseek_attention",
           "patch_deepseek"]


class HFLatentCacheView(HFCacheView):
    """One layer of a ``transformers`` ``Cache`` seen as a :class:`~attnzoo.variants.cache.LatentCache`:
    ``update(latent [B, n, R], rope_key [B, n, Rh*Dr]) -> (latents [B, S, R], rope_keys [B, S, Rh*Dr])`` (the
    latent in the keys slot, the rope keys in the values slot, as DeepSeek-V3 lays them out).

    A static layer (``StaticCache``: fixed buffers, what CUDA graphs and ``torch.compile`` decode with) hands back
    its whole buffer of ``max_len`` positions; how many are filled lives on the GPU, so ``static`` is True,
    ``seq_len`` None (reading it would sync the host) and the layer's attention mask says which positions a query
    sees. ``cache_position`` (what older transformers' static layers index by) is passed on when given."""

    def __init__(self, hf_cache, layer_idx: int, cache_position: torch.Tensor | None = None):
        self.hf_cache = getattr(hf_cache, "self_attention_cache", hf_cache)  # EncoderDecoderCache
        self.layer_idx = layer_idx
        self.cache_position = cache_position
        self.keep_first = None  # a static layer: hand back only the first positions (a prefill from position 0)
        layers = getattr(self.hf_cache, "layers", None)
        layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        self.static = layer is not None and bool(getattr(layer, "is_compileable", False))
        if self.static:
            if getattr(layer, "is_sliding", False):
                raise ValueError(f"layer {layer_idx}: a static sliding-window cache layer "
                                 f"({type(layer).__name__}) is not supported for MLA; use StaticCache without "
                                 "sliding layers or transformers' dynamic caches")
            self.max_len = int(layer.max_cache_len)
            self.seq_len = self.past_len = None
        else:
            self.max_len = None
            self.seq_len = int(self.hf_cache.get_seq_length(layer_idx))
            self.past_len = self.seq_len

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = () if self.cache_position is None else ({"cache_position": self.cache_position},)
        c, r = self.hf_cache.update(latent.unsqueeze(1), rope_key.unsqueeze(1), self.layer_idx, *extra)
        if self.static:
            if self.keep_first is not None:
                c, r = c[..., :self.keep_first, :], r[..., :self.keep_first, :]
            return c.squeeze(1), r.squeeze(1)
        seen = self.seq_len + latent.shape[1]
        if c.shape[-2] > seen:  # a sliding-window layer hands back fewer (its window), which the mask then matches
            raise ValueError(f"layer {self.layer_idx}: the transformers cache returned {c.shape[-2]} positions for "
                             f"{self.seq_len} past and {latent.shape[1]} new tokens from a "
                             f"{type(self.hf_cache).__name__}; MLA decodes with transformers' dynamic caches "
                             "(generate()'s default) and StaticCache")
        self.seq_len = seen
        return c.squeeze(1), r.squeeze(1)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.hf_cache.layers[self.layer_idx]
        return layer.keys.squeeze(1), layer.values.squeeze(1)

    def layout(self) -> KVLayout:
        c, r = self.get()
        return KVLayout(latent=c.shape[-1] + r.shape[-1])


class HFMLAAttention(MLAAttention):
    """:class:`~attnzoo.variants.mla.MLAAttention` in place of a Hugging Face attention module (any decoder layer
    that calls ``self_attn(hidden_states=..., attention_mask=..., position_ids=..., cache=...,
    position_embeddings=...)`` and takes ``(attn_output, attn_weights)`` back).

    Args:
        config: the MLA config (``causal=True`` for a decoder).
        layer_idx: the layer's index in the ``transformers`` cache.
        hf_config: the HF (sub-)config of the replaced module (kept for the walker and ``save_pretrained``).
        layer_rope: use the layer's ``position_embeddings`` (DeepSeek-V3's, ``rope_dim`` wide) as they come.
        rope_pairs: the ``rope_dim/2`` rotary pairs of the layer's tables the rope dims use (see the module
            docstring); None: ``layer_rope`` or the module's own frequencies.
    """

    def __init__(self, config: MLAConfig, *, layer_idx: int, hf_config=None, layer_rope: bool = False,
                 rope_pairs: list[int] | tuple[int, ...] | None = None):
        super().__init__(config)
        if rope_pairs is not None and len(rope_pairs) != config.rope_dim // 2:
            raise ValueError(f"rope_pairs: expected rope_dim/2 = {config.rope_dim // 2} pair indices, got "
                             f"{len(rope_pairs)}")
        if rope_pairs is not None and layer_rope:
            raise ValueError("pass layer_rope=True (the layer's tables as they come) or rope_pairs (some of their "
                             "columns), not both")
        self.layer_idx = layer_idx
        self.hf_config = hf_config
        self.layer_rope = layer_rope
        self.rope_pairs = None if rope_pairs is None else [int(i) for i in rope_pairs]
        self.is_causal = config.causal
        self._pair_columns: dict = {}

    def extra_repr(self) -> str:
        rope = "layer" if self.layer_rope else ("pairs" if self.rope_pairs is not None else "own")
        return f"layer_idx={self.layer_idx}, rope={rope}, " + super().extra_repr()

    def _tables(self, position_embeddings):
        """The ``(cos, sin)`` this layer's rope dims use, or None (the module's own frequencies)."""
        if not self.layer_rope and self.rope_pairs is None:
            return None
        if position_embeddings is None:
            raise ValueError(f"layer {self.layer_idx}: this MLA module rotates by its decoder layer's RoPE tables, "
                             "but the layer passed no position_embeddings")
        cos, sin = position_embeddings
        if self.rope_pairs is None:
            if cos.shape[-1] != self.rope_dim:
                raise ValueError(f"layer_rope=True: the layer's position_embeddings have {cos.shape[-1]} columns, "
                                 f"this module rotates rope_dim={self.rope_dim}")
            return cos, sin
        half = cos.shape[-1] // 2
        key = (str(cos.device), half)
        if key not in self._pair_columns:
            if max(self.rope_pairs) >= half:
                raise ValueError(f"rope_pairs {self.rope_pairs}: the layer's tables have {half} pairs")
            self._pair_columns[key] = torch.tensor(self.rope_pairs + [half + p for p in self.rope_pairs],
                                                   device=cos.device)
        idx = self._pair_columns[key]
        return cos.index_select(-1, idx), sin.index_select(-1, idx)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("HFMLAAttention replaces self-attention; encoder_hidden_states is not accepted")
        hf_cache = layer_cache(kwargs)
        cache = None
        if hf_cache is not None:
            cache = HFLatentCacheView(hf_cache, self.layer_idx, kwargs.get("cache_position"))
        rope = self._tables(position_embeddings)
        position_ids = None if rope is not None else kwargs.get("position_ids")
        if cache is not None and cache.static:
            attn_mask, kpm, decode, causal = self._static_masks(attention_mask, hidden_states, cache)
        else:
            attn_mask, kpm = module_masks(attention_mask, hidden_states, cache, self.config.causal, kwargs)
            decode = causal = None
        out = MLAAttention.forward(self, hidden_states, key_padding_mask=kpm, attn_mask=attn_mask,
                                   position_ids=position_ids, cache=cache, position_embeddings=rope, decode=decode,
                                   causal=causal)
        return out, None

    def _static_masks(self, attention_mask, hidden_states, cache):
        """Masks over a static layer's whole buffer: transformers' mask (it holds causality and the positions not
        filled yet; the module's own bottom-right causality off: the buffer runs past the new tokens). Where
        transformers left the mask out (SDPA at a prefill: ``is_causal``, which means the prompt fills positions
        0..n-1), only those n positions are read, causally. Absorbed decode for one new token, the expanded form
        otherwise."""
        n = hidden_states.shape[1]
        attn_mask, kpm = hf_mask_to_keep(attention_mask, cache.max_len)
        if attn_mask is None and kpm is None:
            if n == 1:
                raise ValueError(f"layer {self.layer_idx}: a decode step over a static cache needs the attention "
                                 "mask transformers builds for it (it says which positions are filled); got none")
            cache.keep_first = n
            return None, None, False, True
        if attn_mask is None and n > 1:  # a 2-d padding mask alone: the top-left causality it goes with
            i = torch.arange(n, device=hidden_states.device)[:, None]
            j = torch.arange(cache.max_len, device=hidden_states.device)[None, :]
            attn_mask = (j <= i)[None, None]
        return attn_mask, kpm, n == 1, False


def mla_config_of_deepseek(hf_config, module=None) -> MLAConfig:
    """The :class:`MLAConfig` of a ``transformers`` DeepSeek-V3 attention (its config, and the module for the
    softmax scale it computed: YaRN's mscale included)."""
    c = hf_config
    scale = getattr(module, "scaling", None)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    norm = getattr(module, "kv_a_layernorm", None)
    eps = getattr(norm, "variance_epsilon", getattr(c, "rms_norm_eps", 1e-6))
    return MLAConfig(dim=c.hidden_size, heads=c.num_attention_heads, kv_rank=c.kv_lora_rank,
                     rope_dim=c.qk_rope_head_dim, q_rank=c.q_lora_rank, nope_dim=c.qk_nope_head_dim,
                     v_dim=c.v_head_dim, bias=bool(getattr(c, "attention_bias", False)), causal=True,
                     dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
                     scale=float(scale) if scale is not None else None, norm_eps=float(eps), rope_theta=float(theta),
                     rope_interleave=bool(getattr(c, "rope_interleave", False)))


def _is_deepseek_attention(module) -> bool:
    return (type(module).__name__ in ("DeepseekV3Attention",) and hasattr(module, "kv_b_proj")
            and hasattr(module, "kv_a_proj_with_mqa"))


#: the MLA options a native DeepSeek-V3 model fixes, and the config fields that hold them
_DEEPSEEK_SHAPES = {"kv_rank": "kv_lora_rank", "rope_dim": "qk_rope_head_dim", "q_rank": "q_lora_rank",
                    "nope_dim": "qk_nope_head_dim", "v_dim": "v_head_dim"}


def patch_deepseek(model, options=None, *, layers=None, filter_fn=None):
    """``attnzoo.patch(model, "mla")`` on a model that already is MLA (DeepSeek-V3): its attention modules become
    :class:`HFMLAAttention` with the same weights (:func:`absorb_deepseek_attention`), nothing is converted.
    Returns the :class:`~attnzoo.patches.report.PatchReport`, or None when ``model`` holds no DeepSeek-V3
    attention (the converter then converts it). Shape options given as keywords (``kv_rank``, ``rope_dim``,
    ``q_rank``, ``nope_dim``, ``v_dim``) must be the model's own: a native MLA model keeps its shapes."""
    from ...kv import kv_bytes_per_token
    from ..report import PatchReport

    if not any(_is_deepseek_attention(m) for m in model.modules()):
        return None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    given = options if isinstance(options, dict) else {}
    for opt, field in _DEEPSEEK_SHAPES.items():
        if given.get(opt) is not None and given[opt] != getattr(text, field, None):
            raise ValueError(f"{opt}={given[opt]}: this {text.model_type} model already is MLA with {opt}="
                             f"{getattr(text, field, None)} ({field}); patch(model, 'mla') gives it absorbed decode "
                             "and keeps its shapes (omit the shape options)")
    before = kv_bytes_per_token(model)
    params = sum(p.numel() for p in model.parameters())
    modules = absorb_deepseek_attention(model, layers=layers, filter_fn=filter_fn)
    shown = {opt: getattr(text, field, None) for opt, field in _DEEPSEEK_SHAPES.items()}
    return PatchReport(variant="mla", architecture=text.model_type, options=shown, modules=modules,
                       params_before=params, params_after=sum(p.numel() for p in model.parameters()),
                       kv_bytes_per_token_before=before, kv_bytes_per_token_after=kv_bytes_per_token(model),
                       native=True, notes=["already MLA: same weights and cache; decoding now absorbed (the cache is "
                                           "never expanded through kv_b_proj)"])


def absorb_deepseek_attention(model, *, layers=None, filter_fn=None) -> list[str]:
    """Replace every ``DeepseekV3Attention`` of ``model`` by an :class:`HFMLAAttention` with the same weights
    (the state dict is unchanged, names one to one): same prefill, and decoding absorbed over the latent cache
    instead of ``transformers``' re-expansion of the whole cache through ``kv_b_proj`` at every step. Returns the
    names of the modules replaced (none: ``ValueError``)."""
    found = [(name, m) for name, m in model.named_modules() if _is_deepseek_attention(m)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no DeepseekV3Attention module to give absorbed MLA decode")
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        missing = sorted(wanted - {m.layer_idx for _, m in found})
        if missing:
            raise ValueError(f"layers={sorted(wanted)}: no attention layer with index {missing}; valid indices: "
                             f"0..{len(found) - 1}")
        found = [(name, m) for name, m in found if m.layer_idx in wanted]
    if filter_fn is not None:
        found = [(name, m) for name, m in found if filter_fn(m, name)]
    if not found:
        from ...errors import NoMatchingModuleError

        raise NoMatchingModuleError(f"no DeepseekV3Attention matched (layers={layers!r}, filter_fn={filter_fn!r})")
    for name, old in found:
        cfg = mla_config_of_deepseek(old.config, old)
        new = HFMLAAttention(cfg, layer_idx=old.layer_idx, hf_config=old.config, layer_rope=True)
        p = next(old.parameters())
        new.to(device=p.device, dtype=p.dtype)
        new.load_state_dict(old.state_dict(), strict=True)
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return [name for name, _ in found]
