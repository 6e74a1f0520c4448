"""attnzoo's :class:`~attnzoo.variants.dense.DenseAttention` (and, for the sparse patterns,
:class:`~attnzoo.variants.sparse.SparseAttention`) speaking a Hugging Face attention layer's
call signature, for architectures without ``num_key_value_heads``.

The HF layer calls its attention module with ``hidden_states``, an ``attention_mask``
(additive float ``[b, 1, q, k]``, boolean ``[b, 1, q, k]``, a 2-d padding mask, or None),
a cache under ``cache``, ``past_key_values`` or ``layer_past`` (a ``transformers`` ``Cache``; the keyword
changed across versions, see :mod:`attnzoo.hf_compat`), maybe
``position_ids``/``position_embeddings``, ``is_causal``, ``output_attentions``... and
expects ``(attn_output, attn_weights)`` back. :class:`HFDenseAttention` translates:
masks become attnzoo keep masks (:mod:`attnzoo.ops.masks`), the HF cache is wrapped as an
attnzoo :class:`~attnzoo.variants.cache.Cache` (so ``generate()`` stores the smaller
GQA/MQA cache in HF's own cache object), and RoPE runs inside ``DenseAttention`` from
``position_ids`` with the HF model's frequencies. Attention probabilities are never
materialised (fused kernels), so ``attn_weights`` is None.

:class:`HFSparseAttention` runs a sparse pattern (``sliding_window``, ``longformer``,
``bigbird``) on :func:`attnzoo.ops.sparse_attention`; Hugging Face's mask becomes the key-padding
mask (see :mod:`attnzoo.patches.hf.pattern_call`).
"""
from __future__ import annotations

import torch
from torch import nn

from ...hf_compat import layer_cache
from ...ops.masks import causal_keep
from ...variants.cache import Cache
from ...variants.dense import DenseAttention, DenseConfig
from ...variants.sparse import SparseAttention, SparseConfig
from .mask_memo import memoized
from .pattern_call import plan_pattern_call, run_pattern_call

__all__ = ["HFDenseAttention", "HFSparseAttention", "hf_mask_to_keep", "HFCacheView"]


def hf_mask_to_keep(mask: torch.Tensor | None, k_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """HF ``attention_mask`` -> ``(attn_mask, key_padding_mask)`` in attnzoo's convention (True = keep).

    4-d boolean masks pass through; 4-d float masks are additive (0 = keep, a large negative
    number = masked; other values would be a bias attnzoo does not take and raise); 2-d masks of
    ones and zeros are key-padding masks. The result is memoized per mask tensor
    (:mod:`.mask_memo`): every layer of a forward gets the same tensors, and the check of a float
    mask reads the GPU once.
    """
    if mask is None:
        return None, None
    return memoized((mask,), ("hf_mask_to_keep", k_len), lambda: _keep_of(mask, k_len))


def _keep_of(mask: torch.Tensor, k_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if mask.dim() == 2:
        return None, mask[:, -k_len:] != 0
    if mask.dim() != 4:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}: expected [batch, k_len] or "
                         "[batch, heads|1, q_len, k_len]")
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask, None
    keep = mask == 0
    # the check reads the GPU on the host: not inside a CUDA-graph capture (a sync there invalidates it) or a
    # torch.compile trace; the eager calls before a capture have checked masks built the same way
    if not _capturing_or_compiling() and not bool((keep | (mask <= -1e4)).all()):
        raise ValueError("attention_mask holds additive biases (values neither 0 nor a large negative number); "
                         "attnzoo modules take keep masks only")
    return keep, None


def _capturing_or_compiling() -> bool:
    """Whether host reads of tensor values must be skipped: inside ``torch.compile`` tracing or while the current
    CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def module_masks(attention_mask, hidden_states: torch.Tensor, cache, module_causal: bool, kwargs: dict):
    """``(attn_mask, key_padding_mask)`` for an attnzoo module run in place of a Hugging Face self-attention: the
    layer's mask as keep masks over the cached and new keys, and the causal keep when the layer asks for causal
    attention (``is_causal``) of a module that is not causal by itself (shared by the K/V and the latent wrappers)."""
    n = hidden_states.shape[1]
    k_len = n + (cache.seq_len if cache is not None else 0)
    attn_mask, kpm = hf_mask_to_keep(attention_mask, k_len)
    if kwargs.get("is_causal") and not module_causal and n > 1:
        keep = causal_keep(n, k_len, device=hidden_states.device)[None, None]
        attn_mask = keep if attn_mask is None else attn_mask & keep
    return attn_mask, kpm


class HFCacheView(Cache):
    """One layer of a ``transformers`` ``Cache`` seen through attnzoo's :class:`Cache` interface."""

    def __init__(self, hf_cache, layer_idx: int):
        self.hf_cache = getattr(hf_cache, "self_attention_cache", hf_cache)  # EncoderDecoderCache
        self.layer_idx = layer_idx
        self.seq_len = int(self.hf_cache.get_seq_length(layer_idx))
        self.past_len = self.seq_len  # tokens seen before this call (a sliding layer keeps fewer)

    def update(self, k, v):
        k, v = self.hf_cache.update(k, v, self.layer_idx)
        self.seq_len = k.shape[2]
        return k, v

    def get(self):
        layer = self.hf_cache.layers[self.layer_idx]
        return layer.keys, layer.values

    def layout(self):
        from ...kv import KVLayout

        k, _ = self.get()
        return KVLayout(kv_heads=k.shape[1], head_dim=k.shape[3])

    def nbytes(self) -> int:
        k, v = self.get()
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    def reset(self) -> None:
        raise ValueError("reset the transformers cache itself")


class HFDenseAttention(DenseAttention):
    """``DenseAttention`` in place of a Hugging Face attention module.

    Args:
        config: the dense config (``groups`` = KV heads kept).
        layer_idx: the layer's index in the HF cache.
        hf_config: the HF (sub-)config the replaced module had (kept for the walker).
        out_dropout: dropout the HF module applied after its output projection (GPT-2's resid_dropout).
        has_o_proj: False where the HF model keeps the output projection outside (BERT): then
            ``o_proj`` is the identity.
    """

    def __init__(self, config: DenseConfig, *, layer_idx: int, hf_config=None,
                 out_dropout: float = 0.0, has_o_proj: bool = True):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.hf_config = hf_config
        self.is_causal = config.causal
        self.out_dropout = nn.Dropout(out_dropout) if out_dropout else None
        if not has_o_proj:
            self.o_proj = nn.Identity()

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, " + super().extra_repr()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("HFDenseAttention replaces self-attention; encoder_hidden_states (cross-attention) "
                             "is not accepted here")
        hf_cache = layer_cache(kwargs)
        cache = HFCacheView(hf_cache, self.layer_idx) if hf_cache is not None else None
        attn_mask, kpm = module_masks(attention_mask, hidden_states, cache, self.config.causal, kwargs)
        position_ids = kwargs.get("position_ids") if self.inv_freq is not None else None
        out = DenseAttention.forward(self, hidden_states, key_padding_mask=kpm, attn_mask=attn_mask,
                                     position_ids=position_ids, cache=cache)
        if self.out_dropout is not None:
            out = self.out_dropout(out)
        return out, None


class HFSparseAttention(HFDenseAttention, SparseAttention):
    """``SparseAttention`` in place of a Hugging Face attention module: arguments as
    :class:`HFDenseAttention` with a :class:`~attnzoo.variants.sparse.SparseConfig`.

    Hugging Face's mask must be the pattern's causality and padding (what its models build from a
    2-d ``attention_mask``); anything more (packed sequences) runs on the dense op with that mask
    AND the pattern. Decoding works with ``transformers``' dynamic caches, including its
    sliding-window cache; a static cache (keys beyond the current position) is refused.
    """

    def __init__(self, config: SparseConfig, **kwargs):
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config={type(config).__name__}: expected a SparseConfig (e.g. SlidingWindowConfig)")
        super().__init__(config, **kwargs)

    def _attend(self, q, k, v, *, causal, attn_mask, key_padding_mask, cache, hidden_states):
        q_len, k_len = q.shape[2], k.shape[2]
        if cache is not None:
            if self.global_projections:
                raise ValueError("longformer with global_projections=True does not decode with a cache; call the "
                                 "model with use_cache=False")
            past = getattr(cache, "past_len", cache.seq_len)
            if k_len > past + q_len:
                raise ValueError(f"{self.pattern.name}: the cache returned {k_len} keys for {past} past and {q_len} "
                                 "new tokens (a static cache?); attnzoo's sparse modules decode with transformers' "
                                 "dynamic caches (generate()'s default)")
        call = plan_pattern_call(self.pattern, attn_mask, key_padding_mask, q_len, k_len, q.device)
        dropout = self.config.dropout if self.training else 0.0
        out = run_pattern_call(q, k, v, call, dropout=dropout, global_rows=not self.global_projections)
        if self.global_projections:
            out = self._global_rows(out, hidden_states, call.key_padding_mask, dropout, pattern=call.pattern)
        return out
