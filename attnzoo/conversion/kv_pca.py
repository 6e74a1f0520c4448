"""``method="pca"``: merge KV heads by PCA of the model's own keys and values (calibration-aware).

The weight-only methods (``mean``, ``svd``) treat every input direction as equally likely. On a real model the
attention input is far from isotropic, so they keep directions the model never uses and drop the ones it does
(SmolLM2-135M, GQA-3 -> MQA: mean-pooling multiplies the perplexity by 1,270, the weight-only SVD by 8,500).
This method measures the keys and values on calibration text (:mod:`attnzoo.conversion.calibration`) and keeps,
per group of KV heads merged into one, the shared head that explains most of what the partner projections see.

**Values** (corrections into ``o_proj``). Head ``h`` reads KV head ``i`` and adds ``O_h v_i`` (after attention
mixing) to the output, ``O_h`` its ``[dim, head_dim]`` block of ``o_proj`` columns. A shared value
``v_g = A v`` (``v``: the ``r`` member heads' values stacked) and per-head maps ``C_i`` with ``v_i ≈ C_i v_g`` cost
nothing at inference: ``O_h C_i`` is the new block of ``o_proj``. The error that reaches the output is
``Σ_i E‖L_i (v_i − C_i v_g)‖²`` with ``L_i = (Σ_{h reads i} O_hᵀ O_h)^{1/2}``; with ``y = [L_1 v_1; ...]``
it is minimised by the top-``head_dim`` eigenvectors ``U`` of ``E[y yᵀ]`` (PCA; ``E[v vᵀ]`` is measured):
``v_g = Uᵀ y``, ``C_i = L_i⁻¹ U_i``. Biases ride along as an extra input column.

**Keys** (corrections into ``q_proj``), RoPE-commuting as TransMLA's RoRoPE: a map that commutes with every RoPE
rotation is, on a rotated pair ``(a, b)``, a complex scalar acting on ``z = k[a] + i·k[b]``. So per frequency pair
``p`` and group: ``z_{i,p} ≈ c_{i,p} z_{g,p}`` with one shared complex key per pair; the score
``Re(z_q conj(z_i))`` becomes ``Re((conj(c_i) z_q) conj(z_g))``, the correction folds into the query rows of each
head reading ``i``. The error weight of head ``i`` on pair ``p`` is the energy its queries put there,
``w_{i,p}² = Σ_{h reads i} E|z_{q_h,p}|²`` (RoPE makes the pair's error isotropic on average over relative
positions); the shared key is the top eigenvector of ``W C_p W``, ``C_p = E[z_p z_pᴴ]`` (measured, RoPE-invariant:
:meth:`~attnzoo.conversion.calibration.LayerStatistics.key_pair_covariance`). Dims RoPE leaves alone take the
value recipe with ``L_i = (Σ_{h reads i} E[q_h q_hᵀ])^{1/2}`` and the correction ``C_iᵀ`` folded into ``q_proj``.

**Groups.** A GQA-``n`` source going to ``g`` KV heads merges whole existing KV heads, ``r = n/g`` per group.
Which ones merge is free (query heads, with their ``o_proj`` columns, can be reordered without changing the
model), so the heads are grouped by similarity (:func:`similarity_groups`): each group is grown greedily from the
first unassigned head by the head whose addition leaves the smallest relative PCA residual. The query heads and
``o_proj`` columns are reordered to Hugging Face's consecutive layout. With ``g = 1`` (MQA) there is nothing to
choose.

**Values under attention.** What reaches ``o_proj`` is not ``v`` but ``Σ_t α_{h,t} v_t``. With the
attention-mixed moments of the calibration pass (``v_mix``: every KV head's values mixed by each query head's
attention), the shared value head is the PCA of the group's mixed values and each ``C_i`` the least-squares map
under the mixture of ``i``'s own query heads; without them, the raw value moments.

**Output refit** (:func:`refit_output`, run by the converter after a second pass over the same calibration
data): per layer, ``o_proj`` is refitted so that the converted attention outputs reproduce the original ones,
``min ‖O' a_new − O a_old‖² + λ‖O' − O_new‖²``: this also repairs what the compressed keys change in the
attention pattern. ``λ`` = 1.0 × the mean energy of ``a_new`` (measured best of 0.1, 1, 3 on SmolLM2-135M).

Lossless cases stay exact up to float rounding: ``r = 1`` changes nothing, and heads of a group that are equal (or
any rank-``head_dim`` family) are reproduced exactly. Needs keys that reach the scores linearly (no per-head
``k_norm``); the caller checks.
"""
from __future__ import annotations

import math

import torch

from .calibration import LayerStatistics
from .heads import AttnWeights, RopeSpec
from .svd import _sqrt_psd

__all__ = ["pca_pool", "similarity_groups", "group_residual", "refit_output"]


def _aug(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[rows, in+1]`` in float64: the weight with its bias (zeros when None) as the last column (the
    calibration moments include the bias, so the maths is on the affine map)."""
    f = torch.float64
    bias = torch.zeros(w.shape[0], dtype=f, device=w.device) if b is None else b.to(f)
    return torch.cat([w.to(f), bias[:, None]], 1)


def _block(m: torch.Tensor, idx: list[int], hd: int, dims: torch.Tensor) -> torch.Tensor:
    """The ``[len(idx)*len(dims)]²`` sub-matrix of a ``[kv*hd]²`` moment for heads ``idx``, dims ``dims``."""
    rows = torch.cat([i * hd + dims for i in idx])
    return m[rows][:, rows]


def _top_eig(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of Hermitian ``m`` ``[..., n, n]`` (descending)."""
    evals, evecs = torch.linalg.eigh(m)
    return evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]


class _Layer:
    """The moments of one layer that the maths needs, float64, and the weights as affine maps."""

    def __init__(self, w: AttnWeights, rope: RopeSpec, stats: LayerStatistics):
        if (stats.heads, stats.kv_heads, stats.head_dim) != (w.heads, w.kv_heads, w.head_dim):
            raise ValueError(f"calibration statistics of {stats.site!r} ({stats.heads} heads, {stats.kv_heads} KV "
                             f"heads, head_dim {stats.head_dim}) do not match the weights ({w.heads}, {w.kv_heads}, "
                             f"{w.head_dim})")
        self.w, self.rope, self.hd = w, rope, w.head_dim
        self.qpk = w.heads // w.kv_heads
        self.a, self.b = rope.pairs()
        self.rest = torch.arange(rope.rotary_dim, w.head_dim)
        self.kmom, self.vmom, self.qmom = stats.key_moment(), stats.value_moment(), stats.query_moment()
        self.vmix = stats.mixed_value_moment()  # [kv, kv*hd, kv*hd] or None
        self.pair_cov = stats.key_pair_covariance(self.a, self.b) if rope.rotary_dim else None  # [P, kv, kv]
        o = w.o.to(torch.float64).reshape(w.o.shape[0], w.heads, self.hd)  # [dim_out, heads, hd]
        ogram = torch.einsum("dhi,dhj->hij", o, o)  # O_hᵀ O_h
        self.o_weight = ogram.reshape(w.kv_heads, self.qpk, self.hd, self.hd).sum(1)  # Σ_{h reads i}
        self.q_weight = self.qmom.reshape(w.kv_heads, self.qpk, self.hd, self.hd).sum(1)  # Σ_h E[q_h q_hᵀ]
        qdiag = self.q_weight.diagonal(dim1=-2, dim2=-1)  # [kv, hd]
        self.pair_weight = (qdiag[:, self.a] + qdiag[:, self.b]).sqrt() if rope.rotary_dim else None  # [kv, P]

    def query_heads(self, i: int) -> list[int]:
        return list(range(i * self.qpk, (i + 1) * self.qpk))


def _pca_full(mom: torch.Tensor, weight: torch.Tensor, r: int, d: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weighted PCA of ``r`` stacked ``d``-dim heads: ``mom`` ``[r*d, r*d]`` = ``E[x xᵀ]``, ``weight`` ``[r, d, d]``.
    Returns ``A`` ``[d, r*d]`` (shared = ``A x``), ``C`` ``[r, d, d]`` (``x_i ≈ C_i shared``) and the relative
    weighted residual."""
    root, inv = _sqrt_psd(weight)  # [r, d, d]
    lw = torch.block_diag(*root)
    m = lw @ mom @ lw.T
    evals, u = _top_eig(m, d)  # [r*d, d]
    total = m.diagonal().sum().clamp_min(1e-300)
    resid = float((total - evals.clamp_min(0).sum()) / total)
    scale = math.sqrt(r)
    a = u.T @ lw / scale
    c = inv @ u.reshape(r, d, d) * scale
    return a, c, resid


def _pca_pairs(cov: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per rotated pair, a rank-1 complex PCA of ``r`` heads: ``cov`` ``[P, r, r]`` = ``E[z zᴴ]``, ``weight``
    ``[r, P]`` (> 0). Returns ``a`` ``[P, r]`` (shared ``z_g = Σ_i a_i z_i``), ``c`` ``[r, P]``
    (``z_i ≈ c_i z_g``) and the relative weighted residual."""
    wt = weight.T.clamp_min(1e-12).to(cov.dtype)  # [P, r]
    m = wt[:, :, None] * cov * wt[:, None, :]
    evals, u = _top_eig(m, 1)
    u = u[..., 0]  # [P, r]
    total = m.diagonal(dim1=-2, dim2=-1).real.sum().clamp_min(1e-300)
    resid = float((total - evals[..., 0].clamp_min(0).sum()) / total)
    norm = wt.abs().pow(2).mean(-1).sqrt()  # [P]: keeps the shared key's scale near the members'
    a = u.conj() * wt / norm[:, None]
    c = (u * norm[:, None] / wt).T
    return a, c, resid


def _values(layer: _Layer, members: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The shared value map ``A`` ``[hd, r*hd]`` of a group, the corrections ``C`` ``[r, hd, hd]`` and the residual.
    With attention-mixed moments (``v_mix``): ``A`` by PCA of the group's pooled mixed moment, each ``C_i`` by
    least squares under the mixture of its own query heads; else PCA of the raw value moment."""
    r, hd = len(members), layer.hd
    dims = torch.arange(hd)
    if layer.vmix is None:
        return _pca_full(_block(layer.vmom, members, hd, dims), layer.o_weight[members], r, hd)
    mixes = [_block(layer.vmix[i], members, hd, dims) for i in members]  # [r*hd, r*hd] each
    a, _, resid = _pca_full(sum(mixes), layer.o_weight[members], r, hd)
    cs = []
    for j, m in enumerate(mixes):
        cross = m[j * hd:(j + 1) * hd] @ a.T  # E[v_i (A ṽ)ᵀ]
        gram = a @ m @ a.T  # E[(A ṽ)(A ṽ)ᵀ]
        ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(hd, dtype=gram.dtype, device=gram.device)
        cs.append(torch.linalg.solve(gram + ridge, cross.T).T)
    return a, torch.stack(cs), resid


def group_residual(layer: _Layer, members: list[int]) -> float:
    """Relative weighted PCA residual of merging KV heads ``members`` into one (keys plus values)."""
    r, hd = len(members), layer.hd
    _, _, rv = _values(layer, members)
    rk = 0.0
    if layer.pair_cov is not None:
        cov = layer.pair_cov[:, members][:, :, members]
        _, _, rk = _pca_pairs(cov, layer.pair_weight[members])
    if len(layer.rest):
        rest = layer.rest
        _, _, rn = _pca_full(_block(layer.kmom, members, hd, rest), layer.q_weight[members][:, rest][:, :, rest],
                             r, len(rest))
        rk = rn if layer.pair_cov is None else (rk * layer.rope.rotary_dim + rn * len(rest)) / hd
    return rk + rv


def similarity_groups(layer: _Layer, groups: int) -> list[list[int]]:
    """KV heads into ``groups`` groups of equal size, similar heads together (module docstring)."""
    n = layer.w.kv_heads
    r = n // groups
    if groups == 1:
        return [list(range(n))]
    if r == 1:
        return [[i] for i in range(n)]
    left, out = list(range(n)), []
    while left:
        group = [left.pop(0)]
        while len(group) < r:
            best = min(left, key=lambda j: (group_residual(layer, group + [j]), j))
            group.append(best)
            left.remove(best)
        out.append(group)
    return out


def pca_pool(w: AttnWeights, groups: int, rope: RopeSpec | None, stats: LayerStatistics) -> AttnWeights:
    """Merge ``w``'s KV heads into ``groups`` by calibrated PCA (module docstring); ``stats`` from a calibration
    pass over the unconverted layer."""
    if w.o is None:
        raise ValueError("method='pca' needs the output projection (o_proj) to fold the value correction into")
    rope = rope or RopeSpec()
    n, hd, heads = w.kv_heads, w.head_dim, w.heads
    r = n // groups
    if r == 1:
        return w
    layer = _Layer(w, rope, stats)
    qpk = layer.qpk
    f = torch.float64
    k, v = _aug(w.k, w.k_bias).reshape(n, hd, -1), _aug(w.v, w.v_bias).reshape(n, hd, -1)
    q = _aug(w.q, w.q_bias).reshape(heads, hd, -1)
    o = w.o.to(f).reshape(w.o.shape[0], heads, hd)
    k_new = torch.empty(groups, hd, k.shape[-1], dtype=f, device=k.device)
    v_new = torch.empty(groups, hd, v.shape[-1], dtype=f, device=k.device)
    q_new, o_new = torch.empty_like(q), torch.empty_like(o)
    a_idx, b_idx, rest = layer.a, layer.b, layer.rest
    for g, members in enumerate(similarity_groups(layer, groups)):
        # values: shared V_g = A [V_i], o_proj blocks O_h C_i
        av, cv, _ = _values(layer, members)
        v_new[g] = av @ v[members].reshape(r * hd, -1)
        # keys
        if rope.rotary_dim:
            ak, ck, _ = _pca_pairs(layer.pair_cov[:, members][:, :, members], layer.pair_weight[members])
            z = torch.complex(k[members][:, a_idx], k[members][:, b_idx])  # [r, P, in]
            zg = (ak.T[:, :, None] * z).sum(0)  # [P, in]
            k_new[g][a_idx], k_new[g][b_idx] = zg.real, zg.imag
        if len(rest):
            an, cn, _ = _pca_full(_block(layer.kmom, members, hd, rest),
                                  layer.q_weight[members][:, rest][:, :, rest], r, len(rest))
            k_new[g][rest] = an @ k[members][:, rest].reshape(r * len(rest), -1)
        for j, i in enumerate(members):
            for t, h in enumerate(layer.query_heads(i)):
                new_h = (g * r + j) * qpk + t  # consecutive layout: group g's query heads are together
                qh = q[h].clone()
                if rope.rotary_dim:
                    zq = torch.complex(qh[a_idx], qh[b_idx]) * ck[j].conj()[:, None]
                    qh[a_idx], qh[b_idx] = zq.real, zq.imag
                if len(rest):
                    qh[rest] = cn[j].T @ q[h][rest]
                q_new[new_h] = qh
                o_new[:, new_h] = o[:, h] @ cv[j]

    def split(t, bias):
        t = t.reshape(-1, t.shape[-1])
        return t[:, :-1].to(w.q.dtype).contiguous(), (None if bias is None else t[:, -1].to(bias.dtype).contiguous())

    q_w, q_b = split(q_new, w.q_bias)
    k_w, k_b = split(k_new, w.k_bias)
    v_w, v_b = split(v_new, w.v_bias)
    return w.replace(q=q_w, k=k_w, v=v_w, o=o_new.reshape(w.o.shape).to(w.o.dtype).contiguous(),
                     q_bias=q_b, k_bias=k_b, v_bias=v_b)


#: the refit's ridge under ``calib_order='sequential'`` (error-correcting targets). Measured on SmolLM2-135M MQA,
#: 16 x 512 calibration tokens, 24 x 512 evaluation (parallel order: 62.4): ridge 0.1 -> 54.3, 0.3 -> 53.3,
#: 1.0 -> 57.3. The parallel order keeps 1.0 (its own measurement, docs/calibration.md).
SEQUENTIAL_REFIT_RIDGE = 0.3


def refit_output(w_new: AttnWeights, w_old: AttnWeights, cross: torch.Tensor, gram: torch.Tensor,
                 ridge: float = 1.0) -> AttnWeights:
    """``o_proj`` refitted by least squares so that ``O' a_new ≈ O a_old`` on calibration inputs, regularised
    towards the converted ``O_new``: ``O' = (O · Σ a_old a_newᵀ + λ O_new) (Σ a_new a_newᵀ + λ I)⁻¹`` with
    ``λ = ridge`` times the mean diagonal of ``Σ a_new a_newᵀ`` (sums from
    :func:`~attnzoo.conversion.calibration.gather_output_moments`). It repairs what the converted keys and values
    still change in each layer's output (the attention pattern as well as the values), layer by layer."""
    f = torch.float64
    lam = ridge * gram.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(gram.shape[0], dtype=f, device=gram.device)
    rhs = w_old.o.to(f) @ cross + lam * w_new.o.to(f)
    o = torch.linalg.solve(gram + lam * eye, rhs.T).T
    return w_new.replace(o=o.to(w_new.o.dtype).contiguous())
