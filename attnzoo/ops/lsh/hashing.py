"""Angular LSH for the ``reformer`` op: seeded random rotations, one GEMM + argmax per call.

``h(x) = argmax([x R; -x R])`` with ``R`` a ``[dim, num_buckets / 2]`` Gaussian matrix per head and round
(Andoni et al.'s angular LSH, as the Reformer paper): nearby directions fall in the same bucket with high
probability. The rotations are drawn from ``seed`` on the CPU (the same numbers on every device and in training
and evaluation) and kept per (shape, seed, device, dtype).

Separate queries and keys (a converted softmax model) are hashed through SMYRF's asymmetric transforms, which
turn maximum inner product search into nearest neighbours: ``G(k) = [k, sqrt(M^2 - |k|^2), 0]`` for a key and
``F(q) = [q, 0, sqrt(M^2 - |q|^2)]`` for a query, with ``M`` at least every norm. attnzoo first rescales a query
to norm ``M`` (a query's scale changes none of its inner-product rankings), so ``F(q) = [q M / |q|, 0, 0]``,
whose hash is the hash of ``[q, 0]``: ``M`` then bounds the key norms only, and a key's bucket depends on the keys
alone. Causal: ``M`` at position ``s`` is the running maximum of the key norms up to ``s`` (a token's bucket never
depends on later tokens, so a decoded token gets the bucket the full forward gives it); bidirectional: the maximum
over the sequence. The last coordinate (zero for both after the rescale) is dropped.
"""
from __future__ import annotations

import torch

__all__ = ["num_buckets_for", "rotations", "hash_vectors", "hash_queries", "hash_keys", "key_norm_bound"]

_ROTATIONS: dict = {}


def num_buckets_for(n: int, bucket_size: int, num_buckets: int | None = None) -> int:
    """Buckets for ``n`` tokens: ``num_buckets`` when given, else 1 when ``n <= bucket_size`` (one bucket: exact
    attention) and otherwise ``ceil(n / bucket_size)`` rounded up to an even number (angular LSH halves)."""
    if num_buckets is not None:
        return int(num_buckets)
    if n <= bucket_size:
        return 1
    nb = -(-n // bucket_size)
    return nb + nb % 2


def rotations(heads: int, dim: int, num_hashes: int, num_buckets: int, seed: int, device, dtype) -> torch.Tensor:
    """``[heads, dim, num_hashes, num_buckets // 2]`` Gaussian rotations drawn from ``seed`` (CPU generator, so
    every device gets the same numbers)."""
    key = (heads, dim, num_hashes, num_buckets, seed, str(device), dtype)
    rot = _ROTATIONS.get(key)
    if rot is None:
        g = torch.Generator().manual_seed(int(seed))
        rot = torch.randn(heads, dim, num_hashes, max(num_buckets // 2, 1), generator=g)
        rot = rot.to(device=device, dtype=dtype)
        if len(_ROTATIONS) > 64:
            _ROTATIONS.clear()
        _ROTATIONS[key] = rot
    return rot


def hash_vectors(x: torch.Tensor, num_hashes: int, num_buckets: int, seed: int, backend: str | None = None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """Buckets ``[batch, heads, num_hashes, n]`` (int64) of ``x [batch, heads, n, dim]``: one GEMM + argmax.

    ``extra``: one more coordinate of every vector (``[batch, heads, n]``): the vectors hashed are ``[x, extra]``
    (rotations of ``dim + 1`` rows), hashed in float32 (float64 for float64) without building them. ``backend``:
    ``"triton"`` (the GEMM and the argmax fused, ``x`` read in place, the ``[n, num_buckets / 2]`` projection never
    written: on CUDA, the default there) or ``"torch"``."""
    b, h, n, d = x.shape
    if num_buckets <= 1:
        return torch.zeros(b, h, num_hashes, n, dtype=torch.long, device=x.device)
    if num_buckets % 2:
        raise ValueError(f"num_buckets={num_buckets}: angular LSH needs an even number of buckets (or 1)")
    from . import triton_kernel

    if backend is None:
        backend = "triton" if x.is_cuda and triton_kernel.available("cuda") is None else "torch"
    # half inputs hash in half (the GEMM accumulates in float32); with an extra coordinate in float32
    dtype = x.dtype if extra is None else _acc(x)
    rot = rotations(h, d + (extra is not None), num_hashes, num_buckets, seed, x.device, dtype)
    if backend == "triton":
        return triton_kernel.hash_buckets(x, rot, None if extra is None else extra.to(dtype))
    if extra is not None:
        x = torch.cat([x.to(dtype), extra.to(dtype)[..., None]], dim=-1)
    proj = torch.einsum("bhnd,hdrk->bhrnk", x.to(dtype), rot)
    hi, lo = proj.max(dim=-1), proj.min(dim=-1)  # argmax([xR; -xR]) without building it
    return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + proj.shape[-1])


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bound(norms: torch.Tensor, causal: bool, prior: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        norms = norms * keep[:, None, :].to(norms.dtype)
    if prior is not None:
        norms = torch.maximum(norms, prior.to(norms.dtype)[..., None].expand_as(norms))
    return norms.cummax(dim=-1).values if causal else norms.amax(dim=-1, keepdim=True).expand_as(norms)


def key_norm_bound(k: torch.Tensor, causal: bool, prior: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """``M`` per key ``[batch, heads, n, 1]``: the running maximum of the key norms (causal; ``prior``
    ``[batch, heads]``: the maximum over the keys before these, from a cache) or their maximum; padded keys
    (``keep [batch, n]`` False) do not count."""
    return _bound(torch.linalg.vector_norm(k, dim=-1, dtype=_acc(k)), causal, prior, keep).unsqueeze(-1)


def hash_keys(k: torch.Tensor, num_hashes: int, num_buckets: int, seed: int, causal: bool,
              prior: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """SMYRF's ``G(k) = [k, sqrt(M^2 - |k|^2)]`` hashed (see the module docstring; ``prior`` and ``keep`` as
    :func:`key_norm_bound`): the norms in float32, the extra coordinate passed beside ``k`` (no copy of ``k``)."""
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=_acc(k))
    m = _bound(norms, causal, prior, keep)
    extra = (m.square() - norms.square()).clamp_min(0).sqrt()
    return hash_vectors(k, num_hashes, num_buckets, seed, extra=extra)


def hash_queries(q: torch.Tensor, num_hashes: int, num_buckets: int, seed: int) -> torch.Tensor:
    """SMYRF's ``F(q)`` for a query rescaled to norm ``M``: the hash of ``[q, 0]`` (see the module docstring)."""
    return hash_vectors(q, num_hashes, num_buckets, seed, extra=q.new_zeros(q.shape[:-1], dtype=_acc(q)))
