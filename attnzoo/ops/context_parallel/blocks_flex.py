"""The visiting-block work of :mod:`.blocks` on FlexAttention: fused kernels (compiled on CUDA) instead of matmuls.

Forward: one ``flex_attention`` call per visiting block with ``return_aux=AuxRequest(lse=True)`` gives the block's
output and log-sum-exp, merged into the running ones as :func:`.blocks.attend_block` merges its tiles. The
``BlockMask`` comes from the global positions: a 128 x 128 tile whose key-minus-query offsets all lie in the band is
full (no mask evaluated), one whose offsets all lie outside is skipped, others evaluate the band on the positions.

Backward: the whole output is ``O = sum_b w_b O_b`` with ``w_b = exp(lse_b - lse)``; so a block's inputs get their
gradient through FlexAttention's own backward (recomputing the block forward under autograd) from
``dO_b = w_b dO`` and ``dlse_b = w_b (rowsum(dO * O_b) - rowsum(dO * O))``. That costs one block forward more
than a FlashAttention-style backward from the saved log-sum-exp, which FlexAttention does not expose.
"""

from __future__ import annotations

import warnings

import torch

from ..flex import flex_function
from .blocks import Band

__all__ = ["flex_reason", "attend_block_flex", "grad_block_flex"]

_BLOCK = 128


def flex_reason(q: torch.Tensor) -> str | None:
    """Why the FlexAttention block kernel cannot serve ``q``'s call, or None."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest  # noqa: F401  (torch >= 2.9)
    except ImportError:
        return "torch.nn.attention.flex_attention has no AuxRequest (torch < 2.9)"
    if q.device.type != "cuda":
        return f"FlexAttention has a backward on CUDA only, inputs are on {q.device.type}"
    if q.shape[-1] < 16:
        return f"compiled FlexAttention needs head_dim >= 16, got {q.shape[-1]}"
    return None


def _positions(spans, device) -> torch.Tensor:
    pos = torch.cat([torch.arange(a, b, device=device) for a, b in spans])
    pad = (-len(pos)) % _BLOCK  # padded tiles read in range (their rows/columns are masked by the lengths)
    return torch.cat([pos, pos[-1:].expand(pad)]) if pad else pos


def _tile_range(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = pos.view(-1, _BLOCK)
    return tiles.amin(1), tiles.amax(1)


_UNBOUNDED = 1 << 62


class _SharedMask:
    """One ``mask_mod`` per device for every block: it reads the positions and the band from buffers that
    :func:`_block_mask` fills before each call. A fresh closure per block would be a new function for the compiled
    FlexAttention to guard on (a recompilation per block, and past ``torch._dynamo``'s recompile limit, the
    unfused path); buffers of a fixed size (grown by powers of two) keep one compiled kernel."""

    def __init__(self, device):
        self.device = device
        self.q = self.k = torch.zeros(0, dtype=torch.long, device=device)
        self.band = torch.zeros(2, dtype=torch.long, device=device)

        def mask_mod(b, h, i, j):
            d = self.k[j] - self.q[i]
            return (d >= self.band[0]) & (d <= self.band[1])

        self.mask_mod = mask_mod

    def load(self, qpos: torch.Tensor, kpos: torch.Tensor, band: torch.Tensor) -> None:
        need = max(len(qpos), len(kpos))
        if need > len(self.q):
            size = 1 << (need - 1).bit_length()
            self.q = torch.zeros(size, dtype=torch.long, device=self.device)
            self.k = torch.zeros(size, dtype=torch.long, device=self.device)
        self.q[: len(qpos)].copy_(qpos)
        self.k[: len(kpos)].copy_(kpos)
        self.band.copy_(band)  # device to device: no host sync


_shared: dict = {}  # device -> _SharedMask
_tables: dict = {}  # (q_spans, k_spans, band, device) -> (BlockMask, q positions, k positions)


def _block_mask(q_spans, k_spans, band: Band, device):
    """The BlockMask of one (query shard, visiting block) pair, with its positions loaded into the shared mask;
    None when the band keeps no pair of the two (the block is skipped)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)
    shared = _shared.get(device)
    if shared is None:
        shared = _shared[device] = _SharedMask(device)
    key = (tuple(q_spans), tuple(k_spans), band, device)
    hit = _tables.get(key)
    if hit is None:
        qpos, kpos = _positions(q_spans, device), _positions(k_spans, device)
        nq, nk = sum(b - a for a, b in q_spans), sum(b - a for a, b in k_spans)
        qmin, qmax = _tile_range(qpos)
        kmin, kmax = _tile_range(kpos)
        dmin, dmax = kmin[None, :] - qmax[:, None], kmax[None, :] - qmin[:, None]
        lo, hi = band
        skip = torch.zeros_like(dmin, dtype=torch.bool)
        full = torch.ones_like(dmin, dtype=torch.bool)
        if lo is not None:
            skip |= dmax < lo
            full &= dmin >= lo
        if hi is not None:
            skip |= dmin > hi
            full &= dmax <= hi
        partial = ~skip & ~full

        def table(sel):
            order = torch.argsort(~sel, dim=-1, stable=True).to(torch.int32)
            return sel.sum(-1, dtype=torch.int32)[None, None], order[None, None]

        (pc, pi), (fc, fi) = table(partial), table(full)
        bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=_BLOCK, mask_mod=shared.mask_mod, seq_lengths=(nq, nk))
        if len(_tables) > 256:  # a long-running process with many shardings: start over
            _tables.clear()
        band_t = torch.tensor([-_UNBOUNDED if lo is None else lo, _UNBOUNDED if hi is None else hi], device=device)
        if not bool((partial | full).any()):  # once per pair: the cache keeps the answer
            bm = None
        hit = _tables[key] = (bm, qpos, kpos, band_t)
    bm, qpos, kpos, band_t = hit
    if bm is None:
        return None
    shared.load(qpos, kpos, band_t)
    return bm


def _flex(q, k, v, bm, scale):
    from torch.nn.attention.flex_attention import AuxRequest

    fn = flex_function(q.device.type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = fn(
            q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True)
        )
    return out, aux.lse


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def attend_block_flex(q, k, v, q_spans, k_spans, band: Band, scale: float, out, lse) -> None:
    """:func:`.blocks.attend_block` on FlexAttention. ``q [B, Hq, Nq, D]`` and ``k``/``v`` ``[B, Hkv, Nk, .]`` in
    the inputs' dtype; ``out [B, Hq, Nq, Dv]`` and ``lse [B, Hq, Nq]`` in the compute dtype (float32; float64 for float64 inputs), updated in place."""
    bm = _block_mask(q_spans, k_spans, band, q.device)
    if bm is None:
        return
    o_b, lse_b = _flex(q, k, v, bm, scale)
    o_b, lse_b = o_b.to(out.dtype), lse_b.to(lse.dtype)
    new = torch.logaddexp(lse, lse_b)
    new_safe = _safe(new)
    out.mul_(torch.exp(lse - new_safe)[..., None]).add_(o_b * torch.exp(lse_b - new_safe)[..., None])
    lse.copy_(new)


def grad_block_flex(q, k, v, do, lse, delta, q_spans, k_spans, band: Band, scale: float, dq, dk, dv) -> None:
    """:func:`.blocks.grad_block` on FlexAttention (shapes as :func:`attend_block_flex`; ``do`` in the inputs'
    dtype, ``lse``/``delta`` float32, ``dq``/``dk``/``dv`` float32, added to in place)."""
    bm = _block_mask(q_spans, k_spans, band, q.device)
    if bm is None:
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        o_b, lse_b = _flex(*leaves, bm, scale)
        acc = lse.dtype  # float32, or float64 for float64 inputs
        w = torch.exp(lse_b.to(acc) - _safe(lse)).detach()  # 0 where the block (or the row) kept nothing
        w = torch.where(torch.isinf(lse_b), torch.zeros_like(w), w)
        d_lse = w * ((do.to(acc) * o_b.detach().to(acc)).sum(-1) - delta)
        grads = torch.autograd.grad(
            [o_b, lse_b], leaves, [(w[..., None] * do.to(acc)).to(o_b.dtype), d_lse.to(lse_b.dtype)]
        )
    for total, g in zip((dq, dk, dv), grads):
        total += g.to(total.dtype)
