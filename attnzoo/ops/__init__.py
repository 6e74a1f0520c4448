"""Functional attention ops: eager references, fused backends, dispatch.

``ops`` knows tensors, not modules. Conventions (layouts, masks, causal alignment)
are documented once, in :mod:`attnzoo.ops.masks`.
"""
from .backends import BACKENDS
from .dispatch import ORDER, Decision, attention, backend_names, explain, last_decision, use_backend
from .masks import causal_keep, combine_masks
from .reference import attention_reference
from .rope import apply_rope, inv_frequencies, rope_cos_sin
from .sparse import (compile_layout, explain_sparse, last_sparse_decision, make_pattern, sparse_attention,
                     use_sparse_backend)

__all__ = ["attention", "attention_reference", "explain", "use_backend", "last_decision", "Decision",
           "backend_names", "BACKENDS", "ORDER", "causal_keep", "combine_masks", "apply_rope", "inv_frequencies",
           "rope_cos_sin", "sparse_attention", "explain_sparse", "use_sparse_backend", "last_sparse_decision",
           "make_pattern", "compile_layout"]
