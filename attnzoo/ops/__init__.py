"""Functional attention ops: an eager reference beside each fused implementation, and dispatch.

``ops`` knows tensors, not modules. One package per op, each with a ``naive.py`` reference:

* :mod:`attnzoo.ops.dense`: ``attention(q, k, v, ...)`` (SDPA kernels, ``flash_attn``, FlexAttention);
* :mod:`attnzoo.ops.sparse`: ``sparse_attention(q, k, v, pattern, ...)`` (block layouts, Triton kernels, ...);
* :mod:`attnzoo.ops.mla`: ``latent_attention(q_lat, q_rope, c, k_rope, ...)``, MLA's absorbed core (split-KV decode);
* :mod:`attnzoo.ops.context_parallel`: both over a sequence sharded across the ranks of a process group (ring
  attention, halo exchange for sliding windows); imported on its own, it is not re-exported here.

Shared here: :mod:`.masks` (the conventions: layouts, masks, causal alignment, documented once), :mod:`.rope`,
:mod:`.dispatch` (backend choice) and :mod:`.flex` (compiled FlexAttention).
"""
from .dense import (BACKENDS, ORDER, Decision, attention, attention_reference, backend_names, explain, last_decision,
                    use_backend)
from .masks import causal_keep, combine_masks
from .mla import explain_latent, latent_attention, use_latent_backend
from .rope import apply_rope, inv_frequencies, rope_cos_sin
from .sparse import (compile_layout, explain_sparse, last_sparse_decision, make_pattern, sparse_attention,
                     use_sparse_backend)

__all__ = ["attention", "attention_reference", "explain", "use_backend", "last_decision", "Decision",
           "backend_names", "BACKENDS", "ORDER", "causal_keep", "combine_masks", "apply_rope", "inv_frequencies",
           "rope_cos_sin", "sparse_attention", "explain_sparse", "use_sparse_backend", "last_sparse_decision",
           "make_pattern", "compile_layout", "latent_attention", "explain_latent", "use_latent_backend"]
