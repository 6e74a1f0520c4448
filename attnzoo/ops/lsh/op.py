"""``lsh_attention``: Reformer's LSH attention given the buckets (sort, then the chunk attention with its
log-sum-exp and the rounds combined: fused kernels reading the rows through the sort permutation on the ``triton``
backend, gathers and a gather back on the ``torch`` one), and :func:`lsh_decode` for the last rows of a sequence
(decoding)."""
from __future__ import annotations

import math

import torch

from ...errors import check_choice, check_positive_int
from ..autocast import autocast_inputs, check_same_dtype
from . import triton_kernel
from .chunked import SEPARATE, SHARED, chunk_attention
from .naive import padded_last

__all__ = ["lsh_attention", "lsh_decode", "LSH_BACKENDS", "combine_rounds"]

LSH_BACKENDS = ("triton", "torch")


#: the largest bucket whose float32 *backward* fits the fused kernel's shared memory (a 128-query chunk reading
#: 256 keys in float32 asks for 288 KiB; an H100 has 227 KiB): float32 training with larger buckets runs on the
#: torch backend (decision: a fallback chosen by the dispatcher, and an error naming the limit when the Triton
#: backend is forced; 16-bit inputs and float32 inference take the kernels at every bucket size up to 128).
TRITON_FP32_GRAD_MAX_BUCKET = 64


def _fp32_grad_too_wide(bucket_size: int, *ts) -> bool:
    return (bucket_size > TRITON_FP32_GRAD_MAX_BUCKET and torch.is_grad_enabled()
            and any(t.dtype == torch.float32 and t.requires_grad for t in ts))


def _backend(q, backend: str | None, bucket_size: int = 0, grad_inputs: tuple = ()) -> str:
    wide = _fp32_grad_too_wide(bucket_size, *grad_inputs)
    if backend is not None:
        check_choice("backend", backend, LSH_BACKENDS)
        if backend == "triton" and wide and q.is_cuda:
            raise ValueError(f"backend='triton' with bucket_size={bucket_size} cannot run the float32 backward "
                             f"(shared memory); use bucket_size <= {TRITON_FP32_GRAD_MAX_BUCKET}, 16-bit inputs, "
                             "or backend=None (the torch backend then serves it)")
        return backend
    return "triton" if q.is_cuda and triton_kernel.available("cuda") is None and not wide else "torch"


def _same_dtype(q, k, v):
    """q, k, v cast to the autocast dtype under ``torch.autocast`` (as SDPA, :mod:`attnzoo.ops.autocast`: RoPE
    leaves q and k in float32 beside a bf16 v); outside autocast, different dtypes are an error naming them."""
    q, k, v = autocast_inputs(q, k, v)
    check_same_dtype("q, k, v", q, k, v)
    return q, k, v


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sort(buckets: torch.Tensor):
    """(permutation, inverse) of a stable sort by bucket: order (bucket, position) per round."""
    perm = _perm(buckets)
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return perm, inv


def _perm(buckets: torch.Tensor) -> torch.Tensor:
    """The permutation (sorted rank -> position, int64) of a stable sort by bucket: order (bucket, position) per
    round; one sort of int32 keys (bucket ids and the padding's bucket fit in 31 bits)."""
    return torch.sort(buckets.to(torch.int32), dim=-1, stable=True).indices


def _gather_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x [b, h, n, d]`` in the order of ``perm [b, h, r, n]`` -> ``[b * h * r, n, d]`` (the torch backend)."""
    b, h, r, n = perm.shape
    d = x.shape[-1]
    out = x.unsqueeze(2).expand(b, h, r, n, d).gather(3, perm.unsqueeze(-1).expand(b, h, r, n, d))
    return out.reshape(b * h * r, n, d)


def combine_rounds(outs: torch.Tensor, lses: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_r softmax_r(lse) o_r`` over dim 2 (``outs [b, h, r, n, d]``, ``lses [b, h, r(+1), n]``); ``extra``
    ``[b, h, n, d]``: the output of one more term whose log-sum-exp is the last of ``lses`` (separate QK's own key).
    Rows whose every term read nothing give 0. The weighted sum is elementwise in float32 (float64 for float64),
    cast to the outputs' dtype (the torch backend and decoding; the Triton backend combines in a kernel)."""
    acc = torch.float64 if outs.dtype == torch.float64 else torch.float32
    lses = lses.to(acc)
    m = lses.amax(dim=2, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(lses - m)
    total = e.sum(dim=2, keepdim=True)
    w = e / torch.where(total > 0, total, torch.ones_like(total))
    r = outs.shape[2]
    out = (w[:, :, :r, :, None] * outs.to(acc)).sum(2)
    if extra is not None:
        out = out + w[:, :, r, :, None] * extra.to(acc)
    return out.to(outs.dtype)


def lsh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                  k_buckets: torch.Tensor | None = None, *, bucket_size: int, causal: bool = False,
                  key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Reformer's LSH attention: ``[batch, heads, n, dv]``.

    Args:
        q, k, v: ``[batch, heads, n, d]`` (k/v may have fewer heads, read as grouped KV heads).
        q_buckets: int ``[batch, heads, rounds, n]`` (:mod:`attnzoo.ops.lsh.hashing`). ``k_buckets``: the keys'
            buckets (``[batch, heads or kv heads, rounds, n]``) for separate queries and keys; None: shared-QK (the
            keys are the normalised queries: one sort, and a token reads itself only when nothing else is there).
        bucket_size: the chunk: a sorted query chunk reads its key chunk and the one before.
        key_padding_mask: bool ``[batch, n]``, True = real token.
        backend: ``"triton"`` (the fused kernels; CUDA, or Triton's interpreter) or ``"torch"``; None: Triton on
            CUDA (but float32 training with ``bucket_size`` above :data:`TRITON_FP32_GRAD_MAX_BUCKET`: torch),
            else torch.

    See :mod:`attnzoo.ops.lsh.naive` for the exact definition (the float64 reference).
    """
    check_positive_int("bucket_size", bucket_size)
    q, k, v = _same_dtype(q, k, v)
    b, h, n, d = q.shape
    if k.shape[2] != n or q_buckets.shape[-1] != n:
        raise ValueError(f"lsh_attention takes queries and keys of one sequence: q has {n} positions, k "
                         f"{k.shape[2]}, q_buckets {q_buckets.shape[-1]}; decode with lsh_decode")
    scale = 1 / math.sqrt(d) if scale is None else float(scale)
    r = q_buckets.shape[2]
    shared = k_buckets is None
    if _backend(q, backend, bucket_size, (q, k, v)) == "triton":  # the sort here, everything past it in the fused kernels
        if shared:
            q_perm = k_perm = _perm(padded_last(q_buckets, key_padding_mask))
        else:  # one sort for both
            q_perm, k_perm = _perm(torch.stack([padded_last(q_buckets, key_padding_mask),
                                                padded_last(_expand_heads(k_buckets, h), key_padding_mask)]))
        return triton_kernel.lsh_fused_attention(q, k, v, q_perm, k_perm, key_padding_mask, chunk=bucket_size,
                                                 causal=causal, self_mode=SHARED if shared else SEPARATE,
                                                 scale=scale)
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    q_perm, q_inv = _sort(padded_last(q_buckets, key_padding_mask))
    k_perm = q_perm if shared else _sort(padded_last(_expand_heads(k_buckets, h), key_padding_mask))[0]
    qs, ks, vs = _gather_rows(q, q_perm), _gather_rows(k, k_perm), _gather_rows(v, k_perm)
    qpos, kpos = q_perm.reshape(b * h * r, n), k_perm.reshape(b * h * r, n)
    kkeep = None
    if key_padding_mask is not None:
        kkeep = key_padding_mask.bool()[:, None, None, :].expand(b, h, r, n).gather(3, k_perm).reshape(b * h * r, n)
    o, lse = chunk_attention(qs, ks, vs, qpos, kpos, kkeep, chunk=bucket_size, causal=causal,
                self_mode=SHARED if shared else SEPARATE, scale=scale)
    o = o.view(b, h, r, n, -1).gather(3, q_inv.unsqueeze(-1).expand(b, h, r, n, o.shape[-1]))
    lse = lse.view(b, h, r, n).gather(3, q_inv)
    if not shared:  # the own key, as if every round read it (see .naive)
        own = (q * k).sum(-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32) * scale
        own = own + math.log(r)
        if key_padding_mask is not None:
            own = own.masked_fill(~key_padding_mask.bool()[:, None, :], float("-inf"))
        return combine_rounds(o, torch.cat([lse, own.unsqueeze(2)], dim=2), v)
    return combine_rounds(o, lse)


def lsh_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
               k_buckets: torch.Tensor | None = None, *, bucket_size: int, causal: bool = True,
               key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The last ``m`` rows of :func:`lsh_attention` over the whole sequence, computed for those rows only.

    ``q [batch, heads, m, d]``: the queries of the last ``m`` positions; ``k``/``v`` ``[batch, heads|kv, n, d]``
    every key; ``q_buckets [batch, heads, rounds, n]``: the buckets of *every* query of the sequence (the sorted
    rank of a query among all queries decides its chunk), ``k_buckets`` the keys' (None: shared-QK). Each row
    gathers the ``2 bucket_size`` keys its chunks hold: ``O(m x bucket_size)`` work past the sort. Equal to the
    last rows of the full call (tests/test_reformer.py).
    """
    q, k, v = _same_dtype(q, k, v)
    b, h, m, d = q.shape
    n = k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else float(scale)
    r = q_buckets.shape[2]
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    shared = k_buckets is None
    q_perm, q_inv = _sort(padded_last(q_buckets, key_padding_mask))
    k_perm = q_perm if shared else _sort(padded_last(_expand_heads(k_buckets, h), key_padding_mask))[0]
    rows = torch.arange(n - m, n, device=q.device)
    rank = q_inv[..., n - m:]  # [b, h, r, m]: sorted rank of each new query
    chunk = rank // bucket_size
    nc = -(-n // bucket_size)
    offs = torch.arange(bucket_size, device=q.device)
    slots = [chunk[..., None] * bucket_size + offs]
    if nc > 1:
        slots.append(((chunk - 1) % nc)[..., None] * bucket_size + offs)
    slot = torch.cat(slots, dim=-1)  # [b, h, r, m, S] sorted key ranks
    valid = slot < n
    kidx = k_perm.gather(3, slot.clamp_max(n - 1).flatten(3)).view_as(slot)  # original key positions
    kk = k.unsqueeze(2).expand(b, h, r, n, d).gather(3, kidx.flatten(3)[..., None].expand(-1, -1, -1, -1, d))
    vv = v.unsqueeze(2).expand(b, h, r, n, v.shape[-1]).gather(
        3, kidx.flatten(3)[..., None].expand(-1, -1, -1, -1, v.shape[-1]))
    kk = kk.view(b, h, r, m, -1, d)
    vv = vv.view(b, h, r, m, -1, v.shape[-1])
    s = torch.einsum("bhmd,bhrmsd->bhrms", q, kk) * scale
    keep = valid
    if causal:
        keep = keep & (kidx <= rows[:, None])
    if key_padding_mask is not None:
        kpm = key_padding_mask.bool()[:, None, None, :].expand(b, h, r, n)
        keep = keep & kpm.gather(3, kidx.flatten(3)).view_as(kidx)
    own = kidx == rows[:, None]
    if shared:
        s = torch.where(own, torch.full_like(s, -1e5), s)
    else:
        keep = keep & ~own
    s = (s if s.dtype == torch.float64 else s.float()).masked_fill(~keep, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    total = e.sum(-1)
    lse = torch.where(total > 0, mx.squeeze(-1) + torch.log(total.clamp_min(1e-38)), float("-inf"))
    o = torch.einsum("bhrms,bhrmsd->bhrmd", (e / torch.where(total > 0, total, 1.0)[..., None]).to(vv.dtype), vv)
    if not shared:
        kr, vr = k[:, :, n - m:], v[:, :, n - m:]
        own_s = (q * kr).sum(-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32) * scale
        own_s = own_s + math.log(r)
        if key_padding_mask is not None:
            own_s = own_s.masked_fill(~key_padding_mask.bool()[:, None, n - m:], float("-inf"))
        return combine_rounds(o, torch.cat([lse, own_s.unsqueeze(2)], dim=2), vr)
    return combine_rounds(o, lse)
