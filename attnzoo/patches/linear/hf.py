"""The linear family behind a Hugging Face attention layer's call signature, its state inside ``transformers``'
cache objects.

:class:`HFLinearAttention` / :class:`HFLinformerAttention` replace an HF attention module (``patch(model,
"linear" | "performer" | "linformer")``): HF's mask becomes the key padding mask (its causality is the module's
own), RoPE comes from the model's ``position_embeddings`` when it passes them (every rope type of the llama
family) and from ``position_ids`` otherwise, and the output is ``(attn_output, None)``.

Inside ``generate()`` the layer's state lives in ``transformers``' cache: :class:`HFStateView` puts a
``StateLayer`` (a ``DynamicLayer`` that keeps no keys) in the layer's place in the cache's ``layers``, holding
the state and the length, so that ``transformers`` counts positions and builds masks as for any layer while the
memory stays the fixed state (plus the window); beam search's reordering applies to the state.
"""
from __future__ import annotations

import torch
from torch import nn

from ...hf_compat import layer_cache
from ...variants.linear import LinearAttention, LinearStateCache, LinformerAttention
from ..hf import hf_mask_to_keep

__all__ = ["HFLinearAttention", "HFLinformerAttention", "HFStateView", "valid_keys"]


def _state_layer_cls():
    """:class:`StateLayer`, defined on first use (``transformers`` is imported lazily)."""
    global _STATE_LAYER
    if _STATE_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class StateLayer(DynamicLayer):
            """A ``transformers`` cache layer holding a linear layer's fixed-size state (``attnzoo_state``) and
            its length: no keys are kept. Beam search's reordering and batch selection apply to the state."""

            def __init__(self):
                super().__init__()
                self.length, self.attnzoo_state = 0, None

            def get_seq_length(self) -> int:
                return self.length

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return self.length + query_length, 0

            def reset(self) -> None:
                self.length, self.attnzoo_state = 0, None

            def _map(self, fn) -> None:
                if self.attnzoo_state is not None:
                    self.attnzoo_state = tuple(fn(t) for t in self.attnzoo_state)

            def reorder_cache(self, beam_idx) -> None:
                self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

            def batch_repeat_interleave(self, repeats: int) -> None:
                self._map(lambda t: t.repeat_interleave(repeats, 0))

            def batch_select_indices(self, indices) -> None:
                self._map(lambda t: t[indices])

            def crop(self, max_length: int) -> None:
                if 0 <= max_length < self.length:
                    raise ValueError(f"a linear-attention layer's state cannot be cropped to {max_length} of its "
                                     f"{self.length} tokens (the state holds them all summed)")

        _STATE_LAYER = StateLayer
    return _STATE_LAYER


_STATE_LAYER = None


class HFStateView(LinearStateCache):
    """One layer of a ``transformers`` ``Cache`` holding a :class:`LinearStateCache`'s tensors (in a
    ``StateLayer`` that replaces the layer's ``DynamicLayer``)."""

    def __init__(self, hf_cache, layer_idx: int, window: int = 0):
        self.hf_cache = getattr(hf_cache, "self_attention_cache", hf_cache)
        self.layer_idx = layer_idx
        super().__init__(window)
        layer = self._layer()
        self.seq_len = layer.length if layer is not None else int(self.hf_cache.get_seq_length(layer_idx))
        if self.seq_len and layer is None:
            raise ValueError(f"layer {layer_idx}: the transformers cache holds {self.seq_len} tokens of keys, not a "
                             "linear-attention state (a cache made before the model was patched?)")

    def _layer(self):
        layers = getattr(self.hf_cache, "layers", None)
        if layers is None:
            raise ValueError(f"{type(self.hf_cache).__name__}: the linear family keeps its state in transformers' "
                             "layered caches (DynamicCache, generate()'s default)")
        layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
        return layer if isinstance(layer, _state_layer_cls()) else None

    def reset(self) -> None:
        self._state, self.seq_len = None, 0

    def state(self):
        layer = self._layer()
        return layer.attnzoo_state if layer is not None else None

    def advance(self, new_state, tokens: int) -> None:
        layer = self._layer()
        if layer is None:
            layers = self.hf_cache.layers
            while len(layers) <= self.layer_idx:
                layers.append(_state_layer_cls()())
            layer = layers[self.layer_idx] = _state_layer_cls()()
            layer.is_initialized, layer.device = True, new_state[0].device
        layer.attnzoo_state = self._state = tuple(new_state)
        layer.length += int(tokens)
        self.seq_len = layer.length


def valid_keys(attention_mask, k_len: int, causal: bool) -> torch.Tensor | None:
    """HF's mask as ``[batch, k_len]`` key padding (True = a real token): a 2-d mask as it is; a 4-d one by its last
    query row (causal, left padding: the last query is real and sees every real key) or its first (encoders,
    right padding)."""
    keep, kpm = hf_mask_to_keep(attention_mask, k_len)
    if keep is not None:
        row = keep[:, 0, -1 if causal else 0, :]
        kpm = row if kpm is None else kpm & row
    if kpm is not None and bool(kpm.all()):
        return None
    return kpm


class _HFMixin:
    def _hf_init(self, layer_idx, hf_config, out_dropout, has_o_proj):
        self.layer_idx = layer_idx
        self.hf_config = hf_config
        self.is_causal = self.config.causal
        self.out_dropout = nn.Dropout(out_dropout) if out_dropout else None
        if not has_o_proj:
            self.o_proj = nn.Identity()


class HFLinearAttention(_HFMixin, LinearAttention):
    """``performer`` / ``linear`` in place of a Hugging Face attention module (arguments as
    :class:`~attnzoo.patches.hf.HFDenseAttention`)."""

    def __init__(self, config, *, layer_idx: int, hf_config=None, out_dropout: float = 0.0, has_o_proj: bool = True):
        super().__init__(config)
        self._hf_init(layer_idx, hf_config, out_dropout, has_o_proj)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, " + super().extra_repr()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("linear attention replaces self-attention; encoder_hidden_states is not accepted")
        hf_cache = layer_cache(kwargs) if self.config.causal else None
        cache = HFStateView(hf_cache, self.layer_idx, self.window) if hf_cache is not None else None
        n = hidden_states.shape[1]
        k_len = n + (cache.seq_len if cache is not None else 0)
        kpm = valid_keys(attention_mask, k_len, self.config.causal)
        pos = kwargs.get("position_ids") if self.inv_freq is not None else None
        out = LinearAttention.forward(self, hidden_states, key_padding_mask=kpm, position_ids=pos, cache=cache,
                                      position_embeddings=kwargs.get("position_embeddings"))
        if self.out_dropout is not None:
            out = self.out_dropout(out)
        return out, None


class HFLinformerAttention(_HFMixin, LinformerAttention):
    """``linformer`` in place of a Hugging Face encoder's attention module."""

    def __init__(self, config, *, layer_idx: int, hf_config=None, out_dropout: float = 0.0, has_o_proj: bool = True):
        super().__init__(config)
        self._hf_init(layer_idx, hf_config, out_dropout, has_o_proj)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        kpm = valid_keys(attention_mask, hidden_states.shape[1], False)
        pos = kwargs.get("position_ids") if self.inv_freq is not None else None
        out = LinformerAttention.forward(self, hidden_states, key_padding_mask=kpm, position_ids=pos)
        if self.out_dropout is not None:
            out = self.out_dropout(out)
        return out, None
