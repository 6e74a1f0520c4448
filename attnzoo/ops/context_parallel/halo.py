"""Halo exchange for band patterns: a sliding window needs only its neighbours' edge keys, not a full ring.

With the contiguous layout, rank ``r``'s queries see keys at most ``window`` positions away, so besides its own
keys it needs the last ``window`` keys of rank ``r - 1`` (and, bidirectional, the first ``window`` of rank
``r + 1``): one exchange with each neighbour, of ``window`` rows, whatever the world size, against ``world - 1``
steps of whole blocks for the ring. Backward sends the halo rows' gradients back to their owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Ring

__all__ = ["halo_exchange"]


def _p2p(ops: list) -> None:
    if ops:
        for r in dist.batch_isend_irecv(ops):
            r.wait()


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, ring: Ring, left: int, right: int):
        first, last = ring.rank == 0, ring.rank == ring.world - 1
        has_left, has_right = left and not first, right and not last
        ops, got = [], {}
        if not last and left:  # the next rank's left halo: my last `left` rows
            ops += [
                dist.P2POp(dist.isend, t[..., -left:, :].contiguous(), ring.next, ring.group, i)
                for i, t in enumerate((k, v))
            ]
        if not first and right:  # the previous rank's right halo: my first `right` rows
            ops += [
                dist.P2POp(dist.isend, t[..., :right, :].contiguous(), ring.prev, ring.group, 2 + i)
                for i, t in enumerate((k, v))
            ]
        if has_left:
            got["left"] = [t.new_empty(*t.shape[:-2], left, t.shape[-1]) for t in (k, v)]
            ops += [dist.P2POp(dist.irecv, t, ring.prev, ring.group, i) for i, t in enumerate(got["left"])]
        if has_right:
            got["right"] = [t.new_empty(*t.shape[:-2], right, t.shape[-1]) for t in (k, v)]
            ops += [dist.P2POp(dist.irecv, t, ring.next, ring.group, 2 + i) for i, t in enumerate(got["right"])]
        _p2p(ops)
        ctx.ring, ctx.left, ctx.right = ring, left, right
        ctx.sizes = (left if has_left else 0, right if has_right else 0)
        outs = []
        for i, t in enumerate((k, v)):
            parts = ([got["left"][i]] if has_left else []) + [t] + ([got["right"][i]] if has_right else [])
            outs.append(torch.cat(parts, dim=-2))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dk_ext, dv_ext):
        ring, left, right = ctx.ring, ctx.left, ctx.right
        nl, nr = ctx.sizes
        first, last = ring.rank == 0, ring.rank == ring.world - 1
        grads, ops, back = [], [], {}
        for i, g in enumerate((dk_ext, dv_ext)):
            n = g.shape[-2] - nl - nr
            grads.append(g[..., nl : nl + n, :].clone())
            if nl:  # the left halo's gradient belongs to the previous rank's last rows
                ops.append(dist.P2POp(dist.isend, g[..., :nl, :].contiguous(), ring.prev, ring.group, 4 + i))
            if nr:
                ops.append(dist.P2POp(dist.isend, g[..., nl + n :, :].contiguous(), ring.next, ring.group, 6 + i))
        if not last and left:
            back["last"] = [g.new_empty(*g.shape[:-2], left, g.shape[-1]) for g in grads]
            ops += [dist.P2POp(dist.irecv, t, ring.next, ring.group, 4 + i) for i, t in enumerate(back["last"])]
        if not first and right:
            back["first"] = [g.new_empty(*g.shape[:-2], right, g.shape[-1]) for g in grads]
            ops += [dist.P2POp(dist.irecv, t, ring.prev, ring.group, 6 + i) for i, t in enumerate(back["first"])]
        _p2p(ops)
        for i, g in enumerate(grads):
            if "last" in back:
                g[..., -left:, :] += back["last"][i]
            if "first" in back:
                g[..., :right, :] += back["first"][i]
        return grads[0], grads[1], None, None, None


def halo_exchange(k: torch.Tensor, v: torch.Tensor, ring: Ring, left: int, right: int):
    """``(k_ext, v_ext)``: this rank's keys and values with ``left`` rows of the previous rank's before them and
    ``right`` rows of the next rank's after them (none at the ends of the sequence); differentiable."""
    return _HaloExchange.apply(k, v, ring, left, right)
