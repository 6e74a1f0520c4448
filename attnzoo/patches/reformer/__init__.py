"""``reformer``: a pretrained softmax model's attention turned into Reformer's LSH attention.

``patch(model, "reformer", num_hashes=4, bucket_size=64)`` (``attnzoo convert --to reformer``) keeps every weight:
queries and keys stay separate (a converted model has its own ``k_proj``), hashed through SMYRF's asymmetric
transforms so that the keys a query's buckets hold are the ones of large inner product
(:mod:`attnzoo.ops.lsh.hashing`). Two ways in, as the sparse patterns (:mod:`attnzoo.patches.patterns`):

* ``kernel`` (the llama family: llama, mistral, qwen2, qwen3, gemma, olmo, phi3, ...): the Hugging Face modules stay
  (RoPE of every kind, q/k norms, ``transformers``' cache); each carries an :class:`LSHSpec`
  (``module.attnzoo_pattern``), and attnzoo's attention implementation runs it on HF's projected q/k/v;
* ``swap`` (bert, roberta and the other encoders): the module is replaced by :class:`HFReformerAttention`.

Decoding (``generate()``): ``transformers``' cache keeps the keys and values; the layer keeps the buckets of every
cached token beside it (:class:`~attnzoo.variants.reformer.LSHBuckets`, on the module, renewed by each prompt), so
a step hashes only its new token, and a decoded token gets exactly what the full forward over the tokens so far
gives it (with the bucket count the prompt fixed). One generation at a time per model (beam search, which reorders
the cache, is refused). Causal models of the swap kind (gpt2, gpt_neox) are not converted: their modules would need
the bucket state inside transformers' cache.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ...errors import UnsupportedArchitectureError
from ...ops.masks import causal_keep
from ...variants.reformer import (LSHBuckets, ReformerAttention, ReformerConfig, ReformerOptions,
                                  reformer_attention)
from ..config import PatchConfig
from ..converters import build_wrapper
from ..hf import HFDenseAttention, hf_mask_to_keep
from ..hf.pattern_call import padding_of
from ..patterns import SWAP, PatternConverter

__all__ = ["Reformer", "ReformerConverter", "LSHSpec", "HFReformerAttention", "reformer"]

STATE_ATTR = "attnzoo_lsh_state"  # a kernel-mode module's bucket state (LSHBuckets) for decoding
_OPTIONS = tuple(f.name for f in fields(ReformerOptions))


@dataclass(frozen=True, kw_only=True)
class Reformer(ReformerOptions, PatchConfig):
    """``attnzoo.Reformer(num_hashes=4, bucket_size=64, num_buckets=None, seed=0)``: ``patch(model, "reformer",
    ...)``."""

    variant: ClassVar[str] = "reformer"


def _padding(keep, kpm, q_len: int, k_len: int, causal: bool, device):
    """Hugging Face's masks as a key-padding mask; a 4-d mask must be causality (or nothing) AND padding."""
    if keep is None:
        return kpm
    base = causal_keep(q_len, k_len, device=device) if causal else torch.ones(q_len, k_len, dtype=torch.bool,
                                                                                 device=device)
    got = padding_of(keep, base)
    if got is None:
        raise ValueError("reformer: this attention mask is more than causality and padding (packed sequences?); LSH "
                         "attention takes a 2-d padding mask")
    got = got if kpm is None else got & kpm
    return None if bool(got.all()) else got


@dataclass(frozen=True, kw_only=True)
class LSHSpec(ReformerOptions):
    """What a kernel-mode module runs: the reformer options and whether the layer is causal; read by attnzoo's
    attention implementation (:mod:`attnzoo.patches.hf.kernel`), which hands it Hugging Face's q/k/v."""

    causal: bool = False
    name: ClassVar[str] = "reformer"

    def describe(self) -> str:
        return (f"reformer(num_hashes={self.num_hashes}, bucket_size={self.bucket_size}, "
                f"num_buckets={self.num_buckets}, local_round={self.local_round}, causal={self.causal})")

    def hf_attention(self, module, query, key, value, attention_mask, *, scaling=None, dropout: float = 0.0,
                     **kwargs):
        """``transformers`` attention-interface call: ``query [b, hq, q, d]``, ``key``/``value`` ``[b, hkv, k, d]``
        (the cache's keys included) -> ``([b, q, hq, d], None)``. Attention dropout is not applied."""
        q_len, k_len = query.shape[2], key.shape[2]
        keep, kpm = hf_mask_to_keep(attention_mask, k_len)
        if kpm is not None and kpm.shape[-1] != k_len:
            kpm = kpm[:, -k_len:]
        kpm = _padding(keep, kpm, q_len, k_len, self.causal, query.device)
        state = None
        if self.causal:
            if q_len == k_len:  # a prompt: a fresh bucket state for the decoding that may follow
                state = LSHBuckets()
                setattr(module, STATE_ATTR, state)
            else:
                state = getattr(module, STATE_ATTR, None)
                if state is None or state.seq_len != k_len - q_len or state._qb.buf.shape[0] != query.shape[0]:
                    raise ValueError(f"reformer: {q_len} new queries on {k_len} cached keys, but this layer's bucket "
                                     f"state holds {0 if state is None else state.seq_len} tokens; decode right "
                                     "after a prompt with a dynamic cache (no beam search, no static cache)")
        elif q_len != k_len:
            raise ValueError("reformer: a bidirectional layer attends to whole sequences (no cache)")
        out = reformer_attention(self, query, key, value, causal=self.causal, shared_qk=False,
                                 key_padding_mask=kpm, state=state, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


class HFReformerAttention(HFDenseAttention, ReformerAttention):
    """:class:`~attnzoo.variants.reformer.ReformerAttention` in place of a Hugging Face encoder's attention
    module (arguments as :class:`~attnzoo.patches.hf.HFDenseAttention`, with a ``ReformerConfig``)."""

    def __init__(self, config: ReformerConfig, **kwargs):
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config={type(config).__name__}: expected a ReformerConfig")
        super().__init__(config, **kwargs)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("HFReformerAttention replaces self-attention; encoder_hidden_states (cross-attention) "
                             "is not accepted here")
        n = hidden_states.shape[1]
        keep, kpm = hf_mask_to_keep(attention_mask, n)
        kpm = _padding(keep, kpm, n, n, self.config.causal, hidden_states.device)
        position_ids = kwargs.get("position_ids") if self.inv_freq is not None else None
        out = ReformerAttention.forward(self, hidden_states, key_padding_mask=kpm, position_ids=position_ids)
        if self.out_dropout is not None:
            out = self.out_dropout(out)
        return out, None


class ReformerConverter(PatternConverter):
    """``patch(model, "reformer", num_hashes=4, bucket_size=64, num_buckets=None, seed=0)``."""

    name = "reformer"
    config_cls, module_config_cls = Reformer, ReformerConfig
    native_field = "config.json (attnzoo record)"
    lossy_note = ("LSH attention reads the keys its buckets hold (about 2 x bucket_size per round), so the outputs "
                  "change until the model is uptrained; with one bucket (bucket_size >= the length) it is exact.")

    def check(self, adapter, config, opts):
        return opts  # the typed config checked the options; nothing depends on the architecture

    def pattern_options(self, opts) -> dict:
        return {k: opts[k] for k in _OPTIONS}

    def module_options(self, opts) -> dict:
        return {**self.pattern_options(opts), "shared_qk": False}

    def pattern(self, opts, causal: bool) -> LSHSpec:
        return LSHSpec(causal=causal, **self.pattern_options(opts))

    def plan(self, site, opts):
        plan = super().plan(site, opts)
        if plan["mode"] == SWAP and site.causal:
            raise UnsupportedArchitectureError(
                f"patch(model, 'reformer'): {site.fqn} is a causal {site.adapter.name} attention, whose module attnzoo "
                "would replace; reformer converts the llama family (llama, mistral, qwen2, qwen3, gemma, olmo, phi3) "
                "and bidirectional encoders (bert, roberta)")
        return plan

    def _wrapper(self, site, w, plan, opts):
        return build_wrapper(site, w, plan["kv_heads"], ReformerConfig, HFReformerAttention,
                             **self.module_options(opts))


reformer = ReformerConverter()
