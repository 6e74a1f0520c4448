"""Reformer's LSH attention: hash (:mod:`.hashing`), sort, attend within chunks, combine the rounds.

* :mod:`.naive`: the float64 reference (the definition, pair by pair);
* :mod:`.hashing`: seeded angular LSH (one GEMM + argmax), SMYRF's transforms for separate queries and keys;
* :mod:`.chunked`: the ``torch`` backend; :mod:`.triton_kernel`: the fused ``triton`` backend (everything past
  the sort, forward and backward: rows read through the sort permutation, rounds combined in a kernel);
* :mod:`.op`: :func:`lsh_attention` (a whole sequence) and :func:`lsh_decode` (its last rows).

See docs/reformer.md.
"""
from .hashing import hash_keys, hash_queries, hash_vectors, num_buckets_for
from .naive import SELF_SCORE, lsh_attention_reference
from .op import LSH_BACKENDS, lsh_attention, lsh_decode

__all__ = ["lsh_attention", "lsh_decode", "lsh_attention_reference", "hash_vectors", "hash_queries", "hash_keys",
           "num_buckets_for", "SELF_SCORE", "LSH_BACKENDS"]
