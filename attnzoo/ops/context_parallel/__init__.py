"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

* :mod:`.sharding`: :class:`Sharding`, how positions are cut across ranks (``"zigzag"`` balances causal work,
  ``"contiguous"`` keeps neighbours adjacent for band patterns);
* :mod:`.ring`: ring attention (K/V blocks travel around the ranks; forward and the reverse-ring backward), on
  :mod:`.blocks` (one visiting block: online softmax forward, FlashAttention-style backward);
* :mod:`.halo`: the halo exchange of band patterns (only the window's neighbouring keys);
* :mod:`.op`: :func:`context_parallel_attention` (dense) and :func:`context_parallel_sparse_attention` (sliding
  window: halo exchange + :func:`attnzoo.ops.sparse_attention` locally, or the ring).

Communication is ``torch.distributed`` point-to-point (gloo and NCCL). See docs/context_parallel.md.
"""

from .op import SPARSE_METHODS, context_parallel_attention, context_parallel_sparse_attention
from .sharding import LAYOUTS, Sharding

__all__ = ["context_parallel_attention", "context_parallel_sparse_attention", "Sharding", "LAYOUTS", "SPARSE_METHODS"]
