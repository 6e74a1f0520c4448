"""The context-parallel ops: dense and band-sparse attention over a sequence sharded across ranks.

Every rank of the group calls the op with its own shards of ``q``, ``k``, ``v`` (``[batch, heads, local_len,
head_dim]``, cut by the same :class:`~.sharding.Sharding`) and gets its shard of the output, equal to the matching
rows of the single-process op on the whole sequence; gradients flow to each rank's shards.
"""

from __future__ import annotations

import torch

from ...errors import check_choice, check_type
from ..dense.call import AttentionCall
from ..sparse.patterns import Dense, Pattern, SlidingWindow
from .comm import Ring, ring_of
from .halo import halo_exchange
from .ring import KERNELS, ring_attention_local
from .sharding import Sharding

__all__ = ["context_parallel_attention", "context_parallel_sparse_attention", "SPARSE_METHODS"]

#: ``method=`` of :func:`context_parallel_sparse_attention`: ``"halo"`` (neighbours' edge keys only; needs the
#: contiguous layout) or ``"ring"`` (every block goes round, the tiles outside the band are skipped).
SPARSE_METHODS = ("halo", "ring")


def _check(q, k, v, sharding: Sharding, ring: Ring, scale, causal=False) -> None:
    check_type("sharding", sharding, Sharding, "an attnzoo.ops.context_parallel.Sharding")
    AttentionCall.build(q, k, v, causal=causal, scale=scale)  # shapes, dtypes, devices, heads, scale
    if sharding.world != ring.world:
        raise ValueError(f"sharding.world={sharding.world} but the process group has {ring.world} ranks")
    n = sharding.length(ring.rank)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] != n:
            raise ValueError(
                f"{name} has {t.shape[2]} positions on rank {ring.rank}, but {sharding} gives this rank "
                f"{n}: pass each rank's shard (Sharding.shard)"
            )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sharding: Sharding,
    *,
    causal: bool = False,
    scale: float | None = None,
    group=None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Dense attention (as :func:`attnzoo.ops.attention`) of a sequence sharded across the ranks of ``group``.

    Args:
        q, k, v: this rank's shards ``[batch, heads, sharding.length(rank), head_dim]`` (grouped KV heads allowed).
        sharding: how the sequence is cut (:class:`Sharding`; ``layout="zigzag"`` balances causal work).
        causal: causal mask on global positions (q and k cover the same positions).
        scale: softmax scale (default ``1/sqrt(head_dim)``).
        group: the context-parallel process group (default: the whole world).
        kernel: the work on one visiting K/V block (:data:`~.ring.KERNELS`): ``"flex"`` (FlexAttention's fused
            kernels, CUDA), ``"eager"`` (tiled matmuls, any device and dtype) or ``"auto"`` (flex where it serves).

    Returns:
        This rank's shard of the output, ``[batch, q_heads, local_len, v_dim]``.

    The ring (:mod:`.ring`) runs on any device and process group (gloo, NCCL). PyTorch's own
    ``torch.distributed.tensor.experimental.context_parallel`` is not a backend here: it patches SDPA for a
    ``with`` block that must hold forward *and* backward, not one call; ``attnzoo bench context_parallel``
    measures it beside this ring.
    """
    check_choice("kernel", kernel, KERNELS)
    ring = ring_of(group)
    _check(q, k, v, sharding, ring, scale, causal)
    return ring_attention_local(q, k, v, sharding, (None, 0 if causal else None), scale, ring, kernel)


def _band_of(pattern) -> tuple[int | None, int | None]:
    if type(pattern) is SlidingWindow:
        return pattern.band()
    if type(pattern) is Dense:
        return (None, 0 if pattern.causal else None)
    raise ValueError(
        f"pattern={pattern.describe() if isinstance(pattern, Pattern) else pattern!r}: context "
        "parallelism serves band patterns, SlidingWindow (make_pattern('sliding_window', ...)) and "
        "Dense; Longformer's and BigBird's global tokens attend across every shard (not sharded)"
    )


def context_parallel_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    sharding: Sharding,
    *,
    scale: float | None = None,
    group=None,
    method: str = "halo",
    kernel: str = "auto",
) -> torch.Tensor:
    """Band-pattern attention (as :func:`attnzoo.ops.sparse_attention`) of a sequence sharded across ranks.

    ``method="halo"`` (default) exchanges only the ``window`` edge keys with each neighbour and runs
    :func:`attnzoo.ops.sparse_attention` locally on ``[halo, own keys, halo]`` (the halo rows' queries are
    zeros, their outputs dropped); it needs ``sharding.layout == "contiguous"`` and every shard at least
    ``window`` long. ``method="ring"`` passes every K/V block around the ring and skips the tiles outside the
    band (any layout, any shard length). ``pattern``: a ``SlidingWindow`` (or ``Dense``, which is the ring).
    ``kernel`` is the ring's block kernel (the halo's local work is :func:`attnzoo.ops.sparse_attention`, which
    picks its own backend). Arguments otherwise as :func:`context_parallel_attention`.
    """
    check_choice("method", method, SPARSE_METHODS)
    check_choice("kernel", kernel, KERNELS)
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern={pattern!r}: expected an attnzoo.ops.sparse Pattern, e.g. "
            "make_pattern('sliding_window', window=256, causal=True)"
        )
    band = _band_of(pattern)
    ring = ring_of(group)
    _check(q, k, v, sharding, ring, scale)
    if method == "ring" or type(pattern) is Dense:
        return ring_attention_local(q, k, v, sharding, band, scale, ring, kernel)
    if sharding.layout != "contiguous":
        raise ValueError(
            f"method='halo' needs Sharding(layout='contiguous'), got layout={sharding.layout!r}: a "
            "window reaches only the neighbouring positions, which zigzag puts on other ranks; "
            "use layout='contiguous' (a band has the same work on every rank) or method='ring'"
        )
    w = pattern.window
    shortest = min(sharding.length(r) for r in range(sharding.world))
    if ring.world > 1 and shortest < w:
        raise ValueError(
            f"window={w} is wider than the shortest shard ({shortest} positions: seq_len="
            f"{sharding.seq_len} over world={sharding.world}): the halo exchange reads only the "
            "neighbouring shards; use method='ring', fewer ranks or a longer sequence"
        )
    from ..sparse.op import sparse_attention

    left, right = w, (0 if pattern.causal else w)
    k_ext, v_ext = halo_exchange(k, v, ring, left, right)
    nl = left if ring.rank > 0 else 0
    nr = k_ext.shape[2] - k.shape[2] - nl
    q_ext = torch.nn.functional.pad(q, (0, 0, nl, nr)) if (nl or nr) else q
    out = sparse_attention(q_ext, k_ext, v_ext, pattern, scale=scale)
    return out[:, :, nl : nl + q.shape[2]]
