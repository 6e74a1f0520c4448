"""Pure-PyTorch block-sparse attention over a :class:`~attnzoo.ops.sparse.layout.BlockLayout` (the ``gather``
backend): each query tile gathers the KV tiles its layout lists, full tiles keep every pair, partial ones evaluate
the pattern. Runs anywhere, with autograd and dropout; memory ``O(n x visited keys)``. It is the layout's executable
specification on CPU: what the fused kernels compute, tile by tile."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_attention", "visit_lists"]

_NEG_INF = float("-inf")


def visit_lists(layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[tiles, m]`` KV tile index, is-partial and is-real flags per query tile (full tiles first); cached on the
    layout."""
    hit = layout._cache.get("visits")
    if hit is None:
        t = layout.num_tiles
        cols = torch.arange(t, device=layout.full_count.device)
        fsel = cols[None, :] < layout.full_count[:, None]
        psel = cols[None, :] < layout.partial_count[:, None]
        m = max(1, int((layout.full_count + layout.partial_count).max()))
        idx = torch.cat([layout.full_index, layout.partial_index], 1).long()
        real = torch.cat([fsel, psel], 1)
        partial = torch.cat([torch.zeros_like(fsel), psel], 1)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :m]  # real slots first
        hit = (idx.gather(1, order) * real.gather(1, order), partial.gather(1, order), real.gather(1, order))
        layout._cache["visits"] = hit
    return hit


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, key_padding_mask=None,
                     scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``[B, Hq, n, Dv]``: attention over the layout's part of the pattern (global rows come out as the layout
    leaves them: rows with nothing to attend to give 0). q ``[B, Hq, n, D]``, k/v ``[B, Hkv, n, D*]``."""
    bound = layout.pattern
    n, b, t = layout.n, layout.tile, layout.num_tiles
    bsz, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    pad = t * b - n
    idx, partial, real = visit_lists(layout)  # [t, m]
    m = idx.shape[1]
    qp = F.pad(q, (0, 0, 0, pad)).view(bsz, hkv, g, t, b, d)
    kp = F.pad(k, (0, 0, 0, pad)).view(bsz, hkv, t, b, d)
    vp = F.pad(v, (0, 0, 0, pad)).view(bsz, hkv, t, b, dv)
    kg, vg = kp[:, :, idx], vp[:, :, idx]  # [B, Hkv, t, m, b, D]
    scale = scale if scale is not None else d ** -0.5
    s = torch.einsum("zhgtqd,zhtmkd->zhgtqmk", qp, kg) * scale
    dev = q.device
    qpos = torch.arange(t, device=dev)[:, None] * b + torch.arange(b, device=dev)  # [t, b]
    kpos = idx[:, :, None] * b + torch.arange(b, device=dev)  # [t, m, b]
    inside = real[:, :, None] & (kpos < n)
    pat = bound.kernel_keep(qpos.clamp(max=n - 1)[:, :, None, None], kpos.clamp(max=n - 1)[:, None])
    keep = inside[:, None] & (~partial[:, None, :, None] | pat)  # [t, b, m, b]: full tiles skip the pattern
    keep = keep[None, None, None]
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask, (0, pad))[:, kpos]  # [B, t, m, b]
        keep = keep & kpm[:, None, None, :, None]
    s = s.masked_fill(~keep, _NEG_INF).flatten(-2)
    p = torch.softmax(s, dim=-1)
    p = p.masked_fill(~keep.flatten(-2).any(-1, keepdim=True), 0.0)  # rows with nothing to attend to
    if dropout_p > 0:
        p = F.dropout(p, p=dropout_p)
    o = torch.einsum("zhgtqmk,zhtmkd->zhgtqd", p.unflatten(-1, (m, b)), vg)
    return o.reshape(bsz, hq, t * b, dv)[:, :, :n]
