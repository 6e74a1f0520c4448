"""attnzoo's :class:`~attnzoo.variants.mla.MLAAttention` in place of a Llama-family attention module: Hugging
Face's call signature (masks, the cache under whatever keyword this transformers version uses, RoPE tables), the
latent cache inside ``transformers``' own cache object (the latent as the keys slot ``[B, 1, S, kv_rank]``, the
rope keys as the values slot ``[B, 1, S, R*rope_dim]``, as ``DeepseekV3Attention`` stores them), so
``generate()`` holds ``kv_rank + R*rope_dim`` numbers per token and layer.

RoPE: the source model's rotary module passes its ``(cos, sin)`` tables for its ``rotary_dim`` dims; the MLA
rope pairs are a subset of the source's frequency pairs (:func:`attnzoo.conversion.mla.fold_factor`), so the
wrapper takes their columns (``rope_pairs``): the converted model turns its rope keys exactly as the source did,
whatever the source's RoPE scaling.
"""
from __future__ import annotations

import torch

from ...hf_compat import layer_cache
from ...ops.masks import causal_keep
from ...variants.cache import Cache
from ...variants.mla import MLAAttention, MLAConfig
from ..hf.wrapper import hf_mask_to_keep

__all__ = ["HFMLAAttention", "HFLatentCacheView"]


class HFLatentCacheView(Cache):
    """One layer of a ``transformers`` cache seen as attnzoo's latent cache (``update(latent, rope_key)``)."""

    def __init__(self, hf_cache, layer_idx: int):
        self.hf_cache = getattr(hf_cache, "self_attention_cache", hf_cache)
        self.layer_idx = layer_idx
        self.seq_len = int(self.hf_cache.get_seq_length(layer_idx))

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor):
        c, r = self.hf_cache.update(latent.unsqueeze(1), rope_key.unsqueeze(1), self.layer_idx)
        self.seq_len = c.shape[2]
        return c.squeeze(1), r.squeeze(1)

    def get(self):
        layer = self.hf_cache.layers[self.layer_idx]
        return layer.keys.squeeze(1), layer.values.squeeze(1)

    def layout(self):
        from ...kv import KVLayout

        c, r = self.get()
        return KVLayout(latent=c.shape[-1] + r.shape[-1])

    def nbytes(self) -> int:
        c, r = self.get()
        return c.numel() * c.element_size() + r.numel() * r.element_size()

    def reset(self) -> None:
        raise ValueError("reset the transformers cache itself")


class HFMLAAttention(MLAAttention):
    """``MLAAttention`` behind a Hugging Face decoder layer. ``rope_pairs``: which of the source's rotary pairs
    the rope dims use (columns of the source's cos/sin tables)."""

    def __init__(self, config: MLAConfig, *, layer_idx: int, hf_config=None, rope_pairs: list[int] | None = None):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.hf_config = hf_config
        self.is_causal = config.causal
        self.rope_pairs = list(rope_pairs) if rope_pairs is not None else None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, " + super().extra_repr()

    def _tables(self, position_embeddings):
        if position_embeddings is None or self.rope_pairs is None:
            return None
        cos, sin = position_embeddings
        half = cos.shape[-1] // 2
        idx = torch.tensor(self.rope_pairs + [half + p for p in self.rope_pairs], device=cos.device)
        return cos.index_select(-1, idx), sin.index_select(-1, idx)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        hf_cache = layer_cache(kwargs)
        cache = HFLatentCacheView(hf_cache, self.layer_idx) if hf_cache is not None else None
        n = hidden_states.shape[1]
        k_len = n + (cache.seq_len if cache is not None else 0)
        attn_mask, kpm = hf_mask_to_keep(attention_mask, k_len)
        if kwargs.get("is_causal") and not self.config.causal and n > 1:
            keep = causal_keep(n, k_len, device=hidden_states.device)[None, None]
            attn_mask = keep if attn_mask is None else attn_mask & keep
        out = MLAAttention.forward(self, hidden_states, key_padding_mask=kpm, attn_mask=attn_mask,
                                   position_ids=kwargs.get("position_ids"), cache=cache,
                                   position_embeddings=self._tables(kwargs.get("position_embeddings")))
        return out, None
