"""``method="svd"``: a shared low-rank basis per group, with the loss folded into Q and O.

Mean-pooling (``method="mean"``) replaces the ``r`` key heads ``K_1..K_r`` of a group by
their average. That ignores two freedoms that cost nothing at inference:

* **Values.** Head ``h`` adds ``O_h · softmax(...) · V_i x`` to the output, where ``O_h`` is
  its ``[dim, head_dim]`` block of columns of ``o_proj``. If ``V_i ≈ C_i V_g`` for a shared
  ``V_g`` and a small ``[head_dim, head_dim]`` matrix ``C_i``, then ``O_h V_i ≈ (O_h C_i) V_g``:
  the per-head matrix folds into ``o_proj`` (same shape), so only ``V_g`` needs a cache.
* **Keys.** Head ``h`` scores ``(Q_h x)ᵀ K_i y``. If ``K_i ≈ C_i K_g`` then the score is
  ``(C_iᵀ Q_h x)ᵀ K_g y``: ``C_iᵀ`` folds into ``q_proj``. With RoPE, ``C_i`` must commute
  with the rotation, so on the rotated dims it is one complex number per frequency pair
  (rotation and scale of that pair; the pair ``(a, b)`` is the complex ``z = a + ib``, RoPE
  multiplies ``z`` by ``e^{imθ}``, the score is ``Re(z_q conj(z_k))``, and ``z_k ≈ c z_g``
  gives ``Re((conj(c) z_q) conj(z_g))``). Dims that RoPE leaves alone take a full matrix.

The best shared basis is a truncated SVD (Eckart–Young): stack the group's heads
``S = [K_1; ...; K_r]`` (``[r·head_dim, dim+1]``, the bias as the last column, so biases
are pooled with their weights), take ``S ≈ U_d Σ_d V_dᵀ`` with ``d = head_dim`` and set
``K_g = U_dᵀ S / √r``, ``C_i = √r · U_d[i]`` (the ``i``-th ``head_dim`` rows of ``U_d``).
On the rotated dims the same is done per frequency pair with a complex rank-1 SVD.
When all heads of a group are equal this returns them exactly (up to a basis change that
``C`` undoes); with ``r = 1`` nothing is changed.

**Weighting.** The error that matters is not ``‖K_i − C_i K_g‖`` but what the partner
projection sees: ``Σ_h ‖Q_hᵀ (K_i − C_i K_g)‖`` over the query heads ``h`` reading ``K_i`` (and
``Σ_h ‖O_h (V_i − C_i V_g)‖`` for values). With ``M_i = Σ_h Q_h Q_hᵀ`` (resp. ``Σ_h O_hᵀ O_h``)
and ``L_i = M_i^{1/2}`` this is ``‖L_i K_i − (L_i C_i) K_g‖``: the SVD runs on the weighted
stack ``[L_1 K_1; ...]`` and ``C_i = L_i^{-1} C̃_i``. On rotated pairs ``L_i`` is the scalar
``√(Σ_h ‖Q_h[a]‖² + ‖Q_h[b]‖²)``. Data-free: it assumes isotropic inputs, so it needs only
the checkpoint (the streaming CLI uses it as is).

It needs keys that reach the attention scores linearly (no per-head ``k_norm`` as in
Qwen3, no ``clip_qkv``); the caller checks that.
"""
from __future__ import annotations

import math

import torch

from .heads import AttnWeights, RopeSpec

__all__ = ["svd_pool"]

_EPS = 1e-6


def _sqrt_psd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of PSD ``m`` ``[..., d, d]`` and its inverse (with a small ridge)."""
    d = m.shape[-1]
    ridge = _EPS * (m.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp_min(1e-12)
    m = m + ridge[..., None, None] * torch.eye(d, dtype=m.dtype, device=m.device)
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(1e-30)
    root = (evecs * evals.sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    inv = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return root, inv


def _shared_basis(s: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real case. ``s``: ``[G, r, d, n]`` member heads; ``weight``: ``[G, r, d, d]`` PSD matrices or None.
    Returns ``shared`` ``[G, d, n]`` and ``c`` ``[G, r, d, d]`` with ``s[g, i] ≈ c[g, i] @ shared[g]``."""
    g, r, d, n = s.shape
    if weight is not None:
        root, inv = _sqrt_psd(weight)
        s = root @ s
    u, _, _ = torch.linalg.svd(s.reshape(g, r * d, n), full_matrices=False)
    u = u[..., :d]  # [G, r*d, d]
    shared = u.transpose(-1, -2) @ s.reshape(g, r * d, n) / math.sqrt(r)
    c = u.reshape(g, r, d, d) * math.sqrt(r)
    if weight is not None:
        c = inv @ c
    return shared, c


def _shared_pairs(z: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex case, one rank-1 basis per rotated pair. ``z``: ``[G, r, P, n]`` complex;
    ``weight``: ``[G, r, P]`` positive or None. Returns ``shared`` ``[G, P, n]`` and ``c`` ``[G, r, P]``
    with ``z[g, i, p] ≈ c[g, i, p] * shared[g, p]``."""
    r = z.shape[1]
    if weight is not None:
        z = z * weight[..., None]
    m = z.permute(0, 2, 1, 3)  # [G, P, r, n]
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    u1 = u[..., :, 0]  # [G, P, r]
    shared = (u1.conj().unsqueeze(-1) * m).sum(-2) / math.sqrt(r)  # [G, P, n]
    c = (u1 * math.sqrt(r)).permute(0, 2, 1)  # [G, r, P]
    if weight is not None:
        c = c / weight
    return shared, c


def _aug(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([w, b[:, None]], 1) if b is not None else w


def svd_pool(w: AttnWeights, groups: int, rope: RopeSpec | None = None, weighted: bool = True) -> AttnWeights:
    """Pool ``w``'s KV heads into ``groups`` by a shared SVD basis per group, folding each head's
    correction into ``q_proj`` (keys) and ``o_proj`` (values). See the module docstring."""
    if w.o is None:
        raise ValueError("method='svd' needs the output projection (o_proj) to fold the value correction into")
    rope = rope or RopeSpec()
    heads, hd, n_kv = w.heads, w.head_dim, w.kv_heads
    r, qpk = n_kv // groups, heads // n_kv  # KV heads per group, query heads per old KV head
    if r == 1:
        return w
    f = torch.float64
    has_kb, has_vb, has_qb = w.k_bias is not None, w.v_bias is not None, w.q_bias is not None
    k = _aug(w.k.to(f), None if w.k_bias is None else w.k_bias.to(f)).reshape(groups, r, hd, -1)
    v = _aug(w.v.to(f), None if w.v_bias is None else w.v_bias.to(f)).reshape(groups, r, hd, -1)
    q = _aug(w.q.to(f), None if w.q_bias is None else w.q_bias.to(f)).reshape(groups, r, qpk, hd, -1)
    o = w.o.to(f).reshape(w.o.shape[0], groups, r, qpk, hd)  # columns grouped per query head

    # ---- values: full-matrix basis, correction into o_proj
    o_h = o.permute(1, 2, 3, 0, 4)  # [G, r, qpk, dim_out, hd]
    v_weight = (o_h.transpose(-1, -2) @ o_h).sum(2) if weighted else None  # Σ_h O_hᵀ O_h
    v_shared, cv = _shared_basis(v, v_weight)
    o_new = (o_h @ cv.unsqueeze(2)).permute(3, 0, 1, 2, 4)  # O_h C_i

    # ---- keys: complex pairs on rotated dims, full matrix on the rest; correction into q_proj
    k_shared = torch.empty(groups, hd, k.shape[-1], dtype=f, device=k.device)
    q_new = q.clone()
    rd = rope.rotary_dim
    if rd:
        a, b = rope.pairs()
        z = torch.complex(k[:, :, a], k[:, :, b])  # [G, r, P, n]
        zq = torch.complex(q[:, :, :, a], q[:, :, :, b])  # [G, r, qpk, P, nq]
        pw = (zq.abs() ** 2).sum(-1).sum(2).sqrt() if weighted else None  # [G, r, P]
        shared, c = _shared_pairs(z, pw)
        k_shared[:, a], k_shared[:, b] = shared.real, shared.imag
        zq = zq * c.conj()[:, :, None, :, None]
        q_new[:, :, :, a], q_new[:, :, :, b] = zq.real, zq.imag
    if rd < hd:
        rest = slice(rd, hd)
        q_rest = q[:, :, :, rest]  # [G, r, qpk, hd-rd, nq]
        k_weight = (q_rest @ q_rest.transpose(-1, -2)).sum(2) if weighted else None  # Σ_h Q_h Q_hᵀ
        shared, ck = _shared_basis(k[:, :, rest].contiguous(), k_weight)
        k_shared[:, rest] = shared
        q_new[:, :, :, rest] = ck.transpose(-1, -2).unsqueeze(2) @ q_rest  # C_iᵀ Q_h

    def split(t, has_bias):
        t = t.reshape(-1, t.shape[-1])
        return (t[:, :-1], t[:, -1]) if has_bias else (t, None)

    k_w, k_b = split(k_shared, has_kb)
    v_w, v_b = split(v_shared, has_vb)
    q_w, q_b = split(q_new, has_qb)
    def cast(t, like):
        return None if t is None else t.to(like.dtype).contiguous()

    return w.replace(q=cast(q_w, w.q), k=cast(k_w, w.k), v=cast(v_w, w.v), o=cast(o_new.reshape(w.o.shape), w.o),
                     q_bias=cast(q_b, w.q), k_bias=cast(k_b, w.k), v_bias=cast(v_b, w.v))
