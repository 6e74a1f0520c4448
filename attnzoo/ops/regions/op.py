"""``region_attention``: attention within the regions of one packed variable-length sequence.

ARR-COC encodes each image region at its own resolution and packs every region of a batch into one sequence
(no padding to the largest region); a token attends only to the tokens of its region. Backends:

* ``"varlen"``: PyTorch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``; CUDA,
  float16/bfloat16, not causal): one fused kernel over the packed sequence, no mask in memory;
* ``"flex"``: FlexAttention with a block-diagonal ``BlockMask`` built from the region ids (compiled on CUDA;
  any dtype; causal or not; off CUDA eager and without backward);
* ``"grouped"``: ``scaled_dot_product_attention`` once per *run* of consecutive regions of equal length, the run
  seen as a batch ``[regions, heads, length, D]`` (strided views of the packed tensors: no copy, no padding, no
  mask): any device and dtype, causal or not, with autograd. ARR-COC packs its regions sorted by length, so a
  batch has one run per level in use (often one or two): a few SDPA calls whose host cost is a fraction of the
  varlen op's;
* ``"masked"``: :func:`attnzoo.ops.attention` with a boolean block-diagonal keep mask (``T x T`` in memory):
  the path that runs anywhere, with autograd.

``backend="auto"``: on CUDA ``"grouped"`` when the regions form at most :data:`GROUPED_MAX_RUNS` runs, else the
first of ``"varlen"``, ``"flex"`` that serves the call; elsewhere ``"grouped"``. A forced backend that cannot serve
raises :class:`~attnzoo.errors.BackendUnavailableError` (it never falls back silently). The float64 oracle is
:func:`.naive.region_attention_reference`.

``lengths`` may be a :class:`RegionLayout`, made once for many calls over the same packing (the layers of a tower):
it holds the offsets on the device, so a call reads nothing on the host and copies nothing to the device (it can
be captured in a CUDA graph); a plain list is turned into one per call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import BackendUnavailableError, check_choice
from ..dense import attention
from ..flex import flex_function, flex_reason

__all__ = ["region_attention", "region_attention_tokens", "region_backend", "BACKENDS", "region_ids", "RegionLayout", "GROUPED_MAX_RUNS"]

BACKENDS = ("auto", "varlen", "flex", "grouped", "masked")
#: ``auto`` on CUDA takes ``"grouped"`` up to this many runs of equal-length regions (one SDPA call each; the
#: varlen op costs about as much host time as four of them).
GROUPED_MAX_RUNS = 4


class RegionLayout:
    """A packing of regions, made once and reused by every call over it (see the module docstring).

    Attributes: ``lengths`` (tuple of ints), ``total``, ``longest``, ``runs`` (``(start, regions, length)`` of each
    run of consecutive equal-length regions), ``device``; ``cu_seqlens`` (int32 offsets ``[R + 1]`` on the
    device) and ``ids`` (the region of every token ``[T]``) are made on first use and kept.
    """

    def __init__(self, lengths: Sequence[int], device=None):
        lengths = tuple(int(n) for n in lengths)
        if not lengths or any(n < 1 for n in lengths):
            raise ValueError(f"lengths={list(lengths[:8])}{'...' if len(lengths) > 8 else ''}: expected positive "
                             "region lengths")
        self.lengths, self.total, self.longest = lengths, sum(lengths), max(lengths)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        runs, start, i = [], 0, 0
        while i < len(lengths):
            j = i
            while j < len(lengths) and lengths[j] == lengths[i]:
                j += 1
            runs.append((start, j - i, lengths[i]))
            start += (j - i) * lengths[i]
            i = j
        self.runs = tuple(runs)
        self._cu = self._ids = None

    @property
    def cu_seqlens(self) -> torch.Tensor:
        if self._cu is None:
            offsets = [0]
            for n in self.lengths:
                offsets.append(offsets[-1] + n)
            self._cu = torch.tensor(offsets, dtype=torch.int32).to(self.device)
        return self._cu

    @property
    def ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = region_ids(self.lengths, self.device)
        return self._ids

    def __repr__(self) -> str:
        return f"RegionLayout({len(self.lengths)} regions, {self.total} tokens, {len(self.runs)} runs)"


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


def region_backend(q, k, v, *, causal: bool = False, backend: str = "auto", lengths=None) -> str:
    """The backend :func:`region_attention` runs for these inputs (see the module docstring); ``lengths`` (a list
    or a :class:`RegionLayout`) lets ``auto`` count the runs (without it: as for many runs)."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        why = _reason(backend, q, k, v, causal)
        if why:
            raise BackendUnavailableError(f"backend={backend!r} cannot serve this call: {why}")
        return backend
    if q.device.type != "cuda":
        return "grouped"
    if lengths is not None:
        runs = len((lengths if isinstance(lengths, RegionLayout) else RegionLayout(lengths)).runs)
        if runs <= GROUPED_MAX_RUNS:
            return "grouped"
    for name in ("varlen", "flex"):
        if _reason(name, q, k, v, causal) is None:
            return name
    return "grouped"


def region_ids(lengths: Sequence[int], device) -> torch.Tensor:
    """The region index of every packed token, ``[T]`` (int32; made on the host, one copy to ``device``)."""
    n = torch.as_tensor(list(lengths))
    return torch.repeat_interleave(torch.arange(len(n), dtype=torch.int32), n).to(device)


def _check(q, k, v, lengths) -> RegionLayout:
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected a packed [1, heads, tokens, head_dim]")
    if not isinstance(lengths, RegionLayout):
        n = [int(x) for x in lengths]
        if not n or any(x < 1 for x in n):
            raise ValueError(f"lengths={n[:8]}{'...' if len(n) > 8 else ''} (sum {sum(n)}): expected positive region "
                             f"lengths summing to the packed length {q.shape[2]} of q, k and v")
        lengths = RegionLayout(n, q.device)
    if lengths.total != q.shape[2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"lengths={list(lengths.lengths[:8])}{'...' if len(lengths.lengths) > 8 else ''} (sum "
                         f"{lengths.total}): expected positive region lengths summing to the packed length "
                         f"{q.shape[2]} of q, k and v")
    if lengths.device != q.device and not (lengths.device.type == q.device.type and lengths.device.index is None):
        raise ValueError(f"the RegionLayout is on {lengths.device}, the tensors on {q.device}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads and k {k.shape[1]}: the KV heads must divide the query heads")
    return lengths


def _grouped(q, k, v, layout: RegionLayout, causal: bool, scale: float) -> torch.Tensor:
    """SDPA per run of equal-length regions on token-major ``[T, H, D]`` -> ``[T, Hq, Dv]`` (contiguous)."""
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    outs = []
    for start, m, n in layout.runs:
        def run(x):  # the run's [m, H, n, D], a strided view
            return x[start:start + m * n].view(m, n, x.shape[1], x.shape[2]).transpose(1, 2)
        o = F.scaled_dot_product_attention(run(q), run(k), run(v), is_causal=causal, scale=scale, **kw)
        outs.append(o.transpose(1, 2).reshape(m * n, o.shape[1], o.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], *,
                     causal: bool = False, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention within each region of a packed sequence.

    Args:
        q, k, v: ``[1, Hq, T, D]``, ``[1, Hkv, T, D]``, ``[1, Hkv, T, Dv]``: the regions one after another.
        lengths: the token count of each region (sum ``T``), or a :class:`RegionLayout` of them (made once for
            many calls: no host-to-device copy per call).
        causal: a token also sees no later token of its region.
        scale: score scale (default ``1 / sqrt(D)``).
        backend: ``"auto"``, ``"varlen"``, ``"flex"``, ``"grouped"`` or ``"masked"`` (module docstring).

    Returns:
        ``[1, Hq, T, Dv]`` (for ``"varlen"`` and ``"grouped"`` a view of a token-major ``[1, T, Hq, Dv]``).
        :func:`region_attention_tokens` is the same on token-major ``[T, H, D]`` tensors.
    """
    layout = _check(q, k, v, lengths)
    name = region_backend(q, k, v, causal=causal, backend=backend, lengths=layout)
    if name in ("grouped", "varlen"):
        out = _token_major(name, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), layout, causal,
                           scale)
        return out.transpose(0, 1).unsqueeze(0)
    return _head_major(name, q, k, v, layout, causal, scale)


def region_attention_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths, *, causal: bool = False,
                            scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """:func:`region_attention` on token-major tensors, as a layer's projections come: ``q [T, Hq, D]``,
    ``k, v [T, Hkv, D]`` -> ``[T, Hq, Dv]`` (the ``"grouped"`` and ``"varlen"`` backends read them without
    transposing; ``lengths``: a list or a :class:`RegionLayout`)."""
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected token-major [tokens, heads, head_dim]")
    if isinstance(lengths, RegionLayout) and q.shape[0] == k.shape[0] == lengths.total \
            and q.shape[1] % k.shape[1] == 0:
        layout = lengths  # checked when it was made; the per-layer call skips the rest
    else:
        layout = _check(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), lengths)
    name = region_backend(q, k, v, causal=causal, backend=backend, lengths=layout)  # reads device, dtype, D
    if name in ("grouped", "varlen"):
        return _token_major(name, q, k, v, layout, causal, scale)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    return _head_major(name, qh, kh, vh, layout, causal, scale)[0].transpose(0, 1)


def _token_major(name, q, k, v, layout: RegionLayout, causal: bool, scale) -> torch.Tensor:
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if name == "grouped":
        return _grouped(q, k, v, layout, causal, scale)
    if hkv != hq:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    cu, longest = layout.cu_seqlens, layout.longest
    # varlen_attn's default scale is 1/sqrt(D); fold any other scale into q (its ``scale`` keyword is recent)
    factor = scale * math.sqrt(d)
    qs = q * factor if abs(factor - 1.0) > 1e-12 else q
    return _varlen()(qs.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest)


def _head_major(name, q, k, v, layout: RegionLayout, causal: bool, scale) -> torch.Tensor:
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ids = layout.ids
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
