"""``region_attention``: attention within the regions of one packed variable-length sequence.

ARR-COC encodes each image region at its own resolution and packs every region of a batch into one sequence
(no padding to the largest region); a token attends only to the tokens of its region. Backends:

* ``"varlen"``: PyTorch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``; CUDA,
  float16/bfloat16, not causal): one fused kernel over the packed sequence, no mask in memory;
* ``"flex"``: FlexAttention with a block-diagonal ``BlockMask`` built from the region ids (compiled on CUDA;
  any dtype; causal or not; off CUDA eager and without backward);
* ``"masked"``: :func:`attnzoo.ops.attention` with a boolean block-diagonal keep mask (``T x T`` in memory):
  the path that runs anywhere, with autograd; the CPU path.

``backend="auto"`` picks the first of these that serves the call; a forced backend that cannot serve raises
:class:`~attnzoo.errors.BackendUnavailableError` (it never falls back silently). The float64 oracle is
:func:`.naive.region_attention_reference`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...errors import BackendUnavailableError, check_choice
from ..dense import attention
from ..flex import flex_function, flex_reason

__all__ = ["region_attention", "region_backend", "BACKENDS", "region_ids"]

BACKENDS = ("auto", "varlen", "flex", "masked")


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _reason(backend: str, q, k, v, causal: bool) -> str | None:
    if backend == "varlen":
        if q.device.type != "cuda":
            return "varlen_attn runs on CUDA only"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"varlen_attn needs float16/bfloat16, got {q.dtype}"
        if causal:
            return "attnzoo uses varlen_attn for non-causal regions only"
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            return f"varlen_attn needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
        if _varlen() is None:
            return "this PyTorch has no torch.nn.attention.varlen"
        return None
    if backend == "flex":
        return flex_reason(q, k, v, 0.0, q.shape[-1])
    return None


def region_backend(q, k, v, *, causal: bool = False, backend: str = "auto") -> str:
    """The backend :func:`region_attention` runs for these inputs (see the module docstring)."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        why = _reason(backend, q, k, v, causal)
        if why:
            raise BackendUnavailableError(f"backend={backend!r} cannot serve this call: {why}")
        return backend
    for name in ("varlen", "flex"):
        if q.device.type == "cuda" and _reason(name, q, k, v, causal) is None:
            return name
    return "masked"


def region_ids(lengths: Sequence[int], device) -> torch.Tensor:
    """The region index of every packed token, ``[T]`` (int32)."""
    n = torch.as_tensor(list(lengths), device=device)
    return torch.repeat_interleave(torch.arange(len(n), device=device, dtype=torch.int32), n)


def _check(q, k, v, lengths) -> list[int]:
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected a packed [1, heads, tokens, head_dim]")
    lengths = [int(n) for n in lengths]
    if any(n < 1 for n in lengths) or sum(lengths) != q.shape[2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"lengths={lengths[:8]}{'...' if len(lengths) > 8 else ''} (sum {sum(lengths)}): expected "
                         f"positive region lengths summing to the packed length {q.shape[2]} of q, k and v")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads and k {k.shape[1]}: the KV heads must divide the query heads")
    return lengths


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], *,
                     causal: bool = False, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention within each region of a packed sequence.

    Args:
        q, k, v: ``[1, Hq, T, D]``, ``[1, Hkv, T, D]``, ``[1, Hkv, T, Dv]``: the regions one after another.
        lengths: the token count of each region (sum ``T``).
        causal: a token also sees no later token of its region.
        scale: score scale (default ``1 / sqrt(D)``).
        backend: ``"auto"``, ``"varlen"``, ``"flex"`` or ``"masked"`` (module docstring).

    Returns:
        ``[1, Hq, T, Dv]``.
    """
    lengths = _check(q, k, v, lengths)
    name = region_backend(q, k, v, causal=causal, backend=backend)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if name == "varlen":
        if hkv != hq:
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
        cu[1:] = torch.as_tensor(lengths, device=q.device).cumsum(0)
        longest = max(lengths)
        # varlen_attn's default scale is 1/sqrt(D); fold any other scale into q (its ``scale`` keyword is recent)
        factor = scale * math.sqrt(d)
        qs = q[0].transpose(0, 1) * factor if abs(factor - 1.0) > 1e-12 else q[0].transpose(0, 1)
        out = _varlen()(qs.contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(),
                        cu, cu, longest, longest)
        return out.transpose(0, 1).unsqueeze(0)
    ids = region_ids(lengths, q.device)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_region(b, h, qi, ki):
            keep = ids[qi] == ids[ki]
            return keep & (qi >= ki) if causal else keep

        t = q.shape[2]
        block = create_block_mask(same_region, None, None, t, t, device=q.device)
        return flex_function(q.device.type)(q, k, v, block_mask=block, scale=scale, enable_gqa=hq != hkv)
    keep = ids[:, None] == ids[None, :]
    return attention(q, k, v, causal=causal, mask=keep, scale=scale)
