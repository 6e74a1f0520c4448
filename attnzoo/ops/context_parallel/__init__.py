"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

* :mod:`.sharding`: :class:`Sharding`, how positions are cut across ranks (``"zigzag"`` balances causal work,
  ``"contiguous"`` keeps neighbours adjacent for band patterns);
* :mod:`.ring`: ring attention (K/V blocks travel around the ranks; forward and the reverse-ring backward), on
  a block kernel for one visiting block: :mod:`.blocks` (tiled matmuls: online softmax forward,
  FlashAttention-style backward; any device) or :mod:`.blocks_flex` (FlexAttention's fused kernels, CUDA);
* :mod:`.halo`: the halo exchange of band patterns (only the window's neighbouring keys);
* :mod:`.op`: :func:`context_parallel_attention` (dense) and :func:`context_parallel_sparse_attention` (sliding
  window: halo exchange + :func:`attnzoo.ops.sparse_attention` locally, or the ring).

Communication is ``torch.distributed`` point-to-point (gloo and NCCL). See docs/context_parallel.md.
"""

from .op import SPARSE_METHODS, context_parallel_attention, context_parallel_sparse_attention
from .ring import KERNELS
from .sharding import LAYOUTS, Sharding

__all__ = [
    "context_parallel_attention",
    "context_parallel_sparse_attention",
    "Sharding",
    "LAYOUTS",
    "SPARSE_METHODS",
    "KERNELS",
]
