"""The MLA op: latent attention (the absorbed core) with its references.

* :mod:`.naive`: the expanded and absorbed forms in plain PyTorch (float64: the oracle), and the weight
  folding helpers (:func:`absorb_query`, :func:`absorbed_output`, :func:`expand_kv`);
* :mod:`.op`: :func:`latent_attention` and its dispatcher (``triton`` split-KV decode, ``dense``, ``eager``);
* :mod:`.triton_decode`: the split-KV (flash-decoding) Triton kernel.

Prefill and training run the expanded form on the dense op (:func:`attnzoo.ops.attention`, which serves a
q/k head dim different from the v head dim); decoding runs the absorbed form here.
"""
from .naive import (absorb_query, absorbed_output, expand_kv, latent_attention_reference, mla_absorbed_reference,
                    mla_expanded_reference)
from .op import explain_latent, last_latent_decision, latent_attention, use_latent_backend

__all__ = ["latent_attention", "explain_latent", "use_latent_backend", "last_latent_decision", "absorb_query",
           "absorbed_output", "expand_kv", "latent_attention_reference", "mla_expanded_reference",
           "mla_absorbed_reference"]
