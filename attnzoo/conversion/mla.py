"""MHA/GQA -> MLA: the weight mathematics, as pure functions on one layer's tensors.

A source layer (:class:`~attnzoo.conversion.heads.AttnWeights`: ``H`` query heads, ``G`` KV heads of ``D`` dims,
RoPE on the first ``rd`` dims of a head) becomes one layer of DeepSeek's multi-head latent attention in Hugging
Face's ``DeepseekV3Attention`` layout (:class:`MLALayer`): ``q_proj`` ``[H*(nope+rope), dim]``,
``kv_a_proj_with_mqa`` ``[kv_rank + R*rope, dim]`` (the latent ``c``, then ``R`` rope keys: ``R = 1`` shared, as
DeepSeek, or ``R = G``, one per source KV head), ``kv_b_proj`` ``[H*(nope+v), kv_rank]``, ``o_proj`` unchanged.

Everything works on *augmented* weights ``[W | b]`` (the bias is the last column, the input ``[x; 1]``), so biases
follow their weights through every projection, and on the second moment ``S = E[[x;1][x;1]^T]`` of the layer's
input (float64, ``[dim+1, dim+1]``): the calibrated methods weight every decision by it; ``S = I`` is the
weight-only (data-free) version of the same method.

**RoPE, one complex number per frequency pair.** Pair ``i`` of a key head (dims ``(a_i, b_i)`` of
:meth:`RopeSpec.pairs`) is the complex number ``z = k[a_i] + j k[b_i]``; RoPE multiplies it by ``e^{j m theta_i}``
and the score is ``Re(z_q conj(z_k) e^{j (m-n) theta_i})``. Any complex combination of the pairs of one frequency
commutes with RoPE. :func:`split_rope` groups the source pairs into ``rope/2`` *fold groups* of ``f = rd/rope``
consecutive frequencies ``{f*j, ..., f*j + f - 1}`` (frequency ``theta_{f*j}``: exactly the frequency of pair ``j``
of a ``rope``-dim RoPE with the source's base, so the result exports to a stock DeepSeek config); the components
of a group are the ``(kv_head, pair)`` numbers of every KV head (shared rope key) or of one KV head (per-head rope
keys). Per group one unit complex direction ``u`` is kept as the rope key ``w = u^H z`` (rotated), and the residual
``z - u w`` goes to the position-free (*nope*) part:

* ``rope_method="pca"``: ``u`` is the top eigenvector of the group's Hermitian second moment ``Z S Z^H``: with
  ``f = 1`` and a shared key this is TransMLA's RoRoPE (PCA across KV heads per frequency pair) and with ``f > 1``
  its FreqFold (neighbouring frequencies folded onto one); we take a *complex* PCA (rotation and scale per pair,
  not only a real mixing of heads), which keeps at least as much energy and still commutes with RoPE.
* ``rope_method="norm"``: MHA2MLA's partial RoPE: ``u`` is the one component of the group with the largest q.k
  2-norm contribution ``sum_h ||q_{h,i}|| ||k_{g,i}||`` (RMS over the calibration data, or weight norms).

The query of head ``h`` for the rope key is ``sum_c conj(u_c) z_{q,h,c}`` over the components of its KV head (an
approximation only in that a folded pair turns at its group's frequency). The nope part is exact bookkeeping:
query head ``h`` keeps its ``D`` source dims unrotated and its KV head's key becomes the residual (or, when a group
has a single component so no residual exists, only the ``D - rd`` dims RoPE never touched).

**Joint low rank.** The nope keys ``K`` and the values ``V`` of all KV heads are stacked as ``M = [alpha K; V]``
(``alpha`` balances their norms: ``alpha^2 = tr(V S V^T) / tr(K S K^T)``) and factorised ``M ~ U_r (U_r^T M)`` with
``U_r`` the top-``r`` eigenvectors of ``M S M^T`` (activation PCA; a truncated SVD of ``M`` when ``S = I``):
``kv_a_proj`` gets ``U_r^T M`` (weights and bias), ``kv_b_proj`` the rows of ``U_r`` (keys divided by ``alpha``),
repeated per query head. ``q_proj`` gets the nope and rope queries, times ``sigma_src / sigma_mla`` so that
DeepSeek's softmax scale ``(nope + rope)^-1/2`` reproduces the source's.

**kv_a_layernorm.** Stock DeepSeek normalises the latent (RMSNorm) before ``kv_b_proj``. :func:`add_anchor` makes
that harmless: one latent channel is a constant ``beta`` (a ``kv_a_proj`` bias on a zero row, read by a zero column
of ``kv_b_proj``), so the RMS is ``sqrt((beta^2 + |c|^2)/n)`` ~ ``beta/sqrt(n)``; ``kv_b_proj`` is scaled by
``beta/sqrt(n)`` and the relative error on ``c`` is ``~ |c|^2 / (2 beta^2)`` (``anchor_beta`` picks ``beta`` from a
bound on ``|c|`` for a given tolerance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check_choice, check_positive_int
from .heads import AttnWeights, RopeSpec

__all__ = ["ROPE_METHODS", "ROPE_KEYS", "MLALayer", "RopeSplit", "augment", "fold_factor", "split_rope", "BUDGETS", "budget_shapes", "nope_dim_of", "rope_pairs_of",
           "balance", "joint_factor", "convert_layer", "full_rank", "add_anchor", "anchor_beta",
           "latent_norm_bound"]

ROPE_METHODS = ("pca", "norm")
ROPE_KEYS = ("shared", "per_head")


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W | b]`` in float64 (a zero column without bias)."""
    w = weight.detach().to(torch.float64)
    b = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device) if bias is None else \
        bias.detach().to(w.dtype).reshape(-1, 1)
    return torch.cat([w, b], dim=1)


def _moment(gram: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if gram is None:
        return torch.eye(n, dtype=torch.float64, device=like.device)
    if tuple(gram.shape) != (n, n):
        raise ValueError(f"gram has shape {tuple(gram.shape)}: expected [{n}, {n}] (the second moment of "
                         "[x; 1] over the layer's input)")
    return gram.to(device=like.device, dtype=torch.float64)


def fold_factor(rotary_dim: int, rope_dim: int, where: str = "") -> int:
    """``f = rotary_dim / rope_dim``: source frequency pairs per kept rope pair (1: RoRoPE, >1: FreqFold)."""
    check_positive_int("rope_dim", rope_dim, minimum=2)
    at = f" ({where})" if where else ""
    valid = [2 * d for d in range(1, rotary_dim // 2 + 1) if (rotary_dim // 2) % d == 0]
    if rope_dim % 2 or rope_dim > rotary_dim or (rotary_dim // 2) % (rope_dim // 2):
        raise ValueError(f"rope_dim={rope_dim}: the source rotates {rotary_dim} dims per head{at}; rope_dim must be "
                         f"even and its pairs must divide the source's {rotary_dim // 2} frequency pairs; valid: "
                         f"{valid}")
    return rotary_dim // rope_dim


def nope_dim_of(head_dim: int, rotary_dim: int, kv_heads: int, rope_dim: int, rope_keys: str) -> int:
    """Per-head nope dims of the conversion: ``head_dim``, or ``head_dim - rotary_dim`` when every fold group has
    a single component (per-head rope keys without folding, or one KV head), so no rotated residual is left."""
    components = (1 if rope_keys == "per_head" else kv_heads) * (rotary_dim // rope_dim)
    return head_dim if components > 1 else head_dim - rotary_dim


def rope_pairs_of(rotary_dim: int, rope_dim: int) -> list[int]:
    """The source frequency pairs whose frequencies the ``rope_dim/2`` rope pairs turn at: ``f*j``."""
    f = fold_factor(rotary_dim, rope_dim)
    return [f * j for j in range(rope_dim // 2)]


#: the KV-cache savings of the MHA2MLA paper's budgets (and of ``attnzoo info``'s MLA rows): -68.75% and -87.5%
BUDGETS = (0.6875, 0.875)


def budget_shapes(per_token: int, rotary_dim: int, saving: float, max_rope_dim: int = 64) -> tuple[int, int]:
    """``(kv_rank, rope_dim)`` of an MLA layer caching ``(1 - saving) * per_token`` numbers per token, where the
    source layer caches ``per_token`` (``2 * kv_heads * head_dim``) and rotates ``rotary_dim`` dims: ``rope_dim``
    the largest valid one (:func:`fold_factor`) up to half the rotary dims, a third of the budget and
    ``max_rope_dim`` (DeepSeek's 64 for 128-dim heads), ``kv_rank`` the rest of the budget (at least 2)."""
    if not 0 < saving < 1:
        raise ValueError(f"saving={saving!r}: expected a fraction in (0, 1), e.g. 0.6875")
    total = round(per_token * (1 - saving))
    pairs = rotary_dim // 2
    cap = max(1, min(max_rope_dim // 2, pairs // 2, total // 6))
    rope_pairs = max(p for p in range(1, cap + 1) if pairs % p == 0)
    rope_dim = 2 * rope_pairs
    return max(total - rope_dim, 2), rope_dim


@dataclass
class RopeSplit:
    """One layer after :func:`split_rope`, augmented float64 rows (``[rows, dim+1]``).

    ``q_nope`` ``[H*nope, dim+1]``, ``k_nope`` ``[G*nope, dim+1]``, ``q_rope`` ``[H*rope, dim+1]``, ``k_rope``
    ``[R*rope, dim+1]`` (``"half"`` layout: real parts then imaginary parts), ``v`` ``[G*D, dim+1]``.
    """

    q_nope: torch.Tensor
    k_nope: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    v: torch.Tensor
    heads: int
    kv_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    rope_heads: int


def _complex_rows(w_aug: torch.Tensor, heads: int, head_dim: int, rope: RopeSpec) -> torch.Tensor:
    """``[heads, rd/2, dim+1]`` complex rows ``W[a_i] + j W[b_i]`` of every head's rotated pairs."""
    a, b = rope.pairs()
    w = w_aug.reshape(heads, head_dim, -1)
    return torch.complex(w[:, a], w[:, b])


def _energy(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``E|z|^2`` of each complex row ``z = r x``: ``Re(r S r^H)``, ``[...]``."""
    sc = s.to(rows.dtype)
    return torch.einsum("...i,ij,...j->...", rows, sc, rows.conj()).real.clamp_min(0)


def _sqrt_hermitian(m: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``m^(1/2)`` and ``m^(-1/2)`` of Hermitian PSD ``[..., n, n]`` matrices (a small ridge keeps the inverse
    bounded where a component reaches no query)."""
    n = m.shape[-1]
    scale = (m.diagonal(dim1=-2, dim2=-1).real.sum(-1) / n).clamp_min(1e-30)
    evals, vecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(0) + ridge * scale[..., None]
    root = (vecs * evals.sqrt().to(vecs.dtype).unsqueeze(-2)) @ vecs.conj().transpose(-1, -2)
    inv = (vecs * evals.rsqrt().to(vecs.dtype).unsqueeze(-2)) @ vecs.conj().transpose(-1, -2)
    return root, inv


def split_rope(w: AttnWeights, rope: RopeSpec, rope_dim: int, *, rope_keys: str = "shared",
               rope_method: str = "pca", gram: torch.Tensor | None = None,
               query_weighted: bool = True) -> RopeSplit:
    """Decouple RoPE (see the module docstring): the rope queries/keys of ``rope_dim`` dims and the nope
    queries/keys, plus the values, as augmented float64 rows. ``gram``: ``E[[x;1][x;1]^T]`` (None: weight-only).
    ``query_weighted`` (``"pca"``): the kept direction minimises the error of the scores, not of the keys (the
    keys whitened by the query moment of their own heads before the PCA; False: TransMLA's plain key PCA)."""
    check_choice("rope_keys", rope_keys, ROPE_KEYS)
    check_choice("rope_method", rope_method, ROPE_METHODS)
    if rope.rotary_dim == 0:
        raise ValueError("the source has no rotary embedding (rotary_dim=0): MLA conversion needs RoPE keys")
    H, G, D, rd = w.heads, w.kv_heads, w.head_dim, rope.rotary_dim
    f = fold_factor(rd, rope_dim)
    P = rope_dim // 2  # kept pairs
    q_aug, k_aug, v_aug = augment(w.q, w.q_bias), augment(w.k, w.k_bias), augment(w.v, w.v_bias)
    s = _moment(gram, q_aug.shape[1], q_aug)
    zq = _complex_rows(q_aug, H, D, rope).reshape(H, P, f, -1)  # [H, P, f, dim+1]
    zk = _complex_rows(k_aug, G, D, rope).reshape(G, P, f, -1)  # [G, P, f, dim+1]
    rep = H // G
    R = 1 if rope_keys == "shared" else G
    # components of a group: [R, P, n] with n = (G/R) * f, ordered (kv head, pair in group)
    comp = zk.reshape(R, G // R, P, f, -1).permute(0, 2, 1, 3, 4).reshape(R, P, (G // R) * f, -1)
    if rope_method == "pca":
        sc = s.to(comp.dtype)
        cov = torch.einsum("rpci,ij,rpdj->rpcd", comp, sc, comp.conj())  # Hermitian [R, P, n, n]
        if query_weighted:
            # the score error of a residual e is sum_h |q_h^H e|^2: whiten the keys by the query moment of each
            # component's own heads (block diagonal over KV heads), keep the top direction there
            qm = torch.einsum("hpti,ij,hpsj->hpts", zq, sc, zq.conj()).reshape(G, rep, P, f, f).sum(1)  # [G,P,f,f]
            qm = qm.reshape(R, G // R, P, f, f).permute(0, 2, 1, 3, 4)  # [R, P, G/R, f, f]
            n = (G // R) * f
            blocks = torch.zeros(R, P, n, n, dtype=comp.dtype, device=comp.device)
            for g in range(G // R):
                blocks[:, :, g * f:(g + 1) * f, g * f:(g + 1) * f] = qm[:, :, g]
            root, inv = _sqrt_hermitian(blocks)
            _, vecs = torch.linalg.eigh(root @ cov @ root)
            top = vecs[..., -1]
            proj = torch.einsum("rpcd,rpd->rpc", root, top)  # key = proj^H z
            u = torch.einsum("rpcd,rpd->rpc", inv, top)  # z ~ u key
        else:
            _, vecs = torch.linalg.eigh(cov)
            u = proj = vecs[..., -1]  # [R, P, n] unit, top eigenvector
    else:
        kn = _energy(zk, s).sqrt()  # [G, P, f]
        qn = _energy(zq, s).sqrt().reshape(G, rep, P, f).sum(1)  # [G, P, f]: sum over the KV head's query heads
        contrib = (qn * kn).reshape(R, G // R, P, f).permute(0, 2, 1, 3).reshape(R, P, -1)
        u = proj = torch.nn.functional.one_hot(contrib.argmax(-1), contrib.shape[-1]).to(comp.dtype)
    key = torch.einsum("rpc,rpci->rpi", proj.conj(), comp)  # [R, P, dim+1]: w = proj^H z
    resid = comp - u[..., None] * key[:, :, None]  # [R, P, n, dim+1]
    # queries: head h, group p: sum over its own KV head's components of conj(u_c) z_q
    u_heads = u.reshape(R, P, G // R, f).permute(0, 2, 1, 3).reshape(G, P, f)  # [G, P, f]
    qrot = torch.einsum("gpf,ghpfi->ghpi", u_heads.conj(), zq.reshape(G, rep, P, f, -1)).reshape(H, P, -1)

    def real_half(z: torch.Tensor) -> torch.Tensor:  # [N, P, dim+1] complex -> [N, 2P, dim+1] real ("half")
        return torch.cat([z.real, z.imag], dim=1)

    q_rope = real_half(qrot).reshape(H * rope_dim, -1)
    k_rope = real_half(key).reshape(R * rope_dim, -1)
    a_idx, b_idx = rope.pairs()
    plain = [i for i in range(D) if i >= rd]  # dims RoPE never touches
    if nope_dim_of(D, rd, G, rope_dim, rope_keys) == D:
        res = resid.reshape(R, P, G // R, f, -1).permute(0, 2, 1, 3, 4).reshape(G, rd // 2, -1)
        k_new = k_aug.reshape(G, D, -1).clone()
        k_new[:, a_idx] = res.real
        k_new[:, b_idx] = res.imag
        keep = list(range(D))
    else:
        k_new = k_aug.reshape(G, D, -1)
        keep = plain
    nope, cols = len(keep), q_aug.shape[1]
    q_nope = q_aug.reshape(H, D, cols)[:, keep].reshape(H * nope, cols)
    k_nope = k_new[:, keep].reshape(G * nope, cols)
    return RopeSplit(q_nope=q_nope, k_nope=k_nope, q_rope=q_rope, k_rope=k_rope, v=v_aug, heads=H, kv_heads=G,
                     nope_dim=nope, rope_dim=rope_dim, v_dim=D, rope_heads=R)


def balance(k: torch.Tensor, v: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """``alpha`` with ``alpha^2 = E|V x|^2 / E|K x|^2`` (1 when either side is empty or zero)."""
    if k.numel() == 0 or v.numel() == 0:
        return 1.0
    s = _moment(gram, k.shape[1], k)
    ek = torch.einsum("ri,ij,rj->", k, s, k).item()
    ev = torch.einsum("ri,ij,rj->", v, s, v).item()
    return math.sqrt(ev / ek) if ek > 0 and ev > 0 else 1.0


def joint_factor(m: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``m ~ b @ a``: ``a = U_r^T m`` ``[rank, dim+1]``, ``b = U_r`` ``[rows, rank]``, ``U_r`` the top-``rank``
    eigenvectors of ``m S m^T`` (activation PCA; truncated SVD when ``gram`` is None). A rank above the rows pads
    with zero channels."""
    check_positive_int("kv_rank", rank)
    s = _moment(gram, m.shape[1], m)
    cov = m @ s @ m.T
    cov = (cov + cov.T) / 2
    evals, vecs = torch.linalg.eigh(cov)
    keep = min(rank, m.shape[0])
    u = vecs[:, -keep:].flip(-1) if keep else vecs[:, :0]
    b = torch.zeros(m.shape[0], rank, dtype=m.dtype, device=m.device)
    b[:, :keep] = u
    return b.T @ m, b


@dataclass
class MLALayer:
    """One converted layer in ``DeepseekV3Attention``'s layout (float64; biases may be all zero).

    ``q`` ``[H*(nope+rope), dim]`` (softmax scale folded in), ``q_bias`` ``[H*(nope+rope)]``, ``kv_a``
    ``[kv_rank + R*rope, dim]`` and ``kv_a_bias``, ``kv_b`` ``[H*(nope+v), kv_rank]``; the output projection is the
    source's. ``rope_heads``: ``R`` (1: DeepSeek's shared rope key). ``alpha``: the K/V balance used.
    """

    q: torch.Tensor
    q_bias: torch.Tensor
    kv_a: torch.Tensor
    kv_a_bias: torch.Tensor
    kv_b: torch.Tensor
    heads: int
    kv_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    rope_heads: int
    alpha: float = 1.0

    @property
    def scale(self) -> float:
        """DeepSeek's softmax scale for these shapes."""
        return (self.nope_dim + self.rope_dim) ** -0.5


def _assemble(sp: RopeSplit, a: torch.Tensor, b: torch.Tensor, alpha: float, scale: float) -> MLALayer:
    H, G, nope, rope, vd = sp.heads, sp.kv_heads, sp.nope_dim, sp.rope_dim, sp.v_dim
    r = a.shape[0]
    rep = H // G
    bk = (b[: G * nope] / alpha).reshape(G, nope, r)
    bv = b[G * nope:].reshape(G, vd, r)
    kv_b = torch.cat([bk, bv], dim=1).repeat_interleave(rep, dim=0).reshape(H * (nope + vd), r)
    fold = scale / (nope + rope) ** -0.5
    cols = sp.q_rope.shape[1]
    q = torch.cat([sp.q_nope.reshape(H, nope, cols), sp.q_rope.reshape(H, rope, cols)], dim=1)
    q = q.reshape(H * (nope + rope), cols)
    q = q * fold
    kv_a = torch.cat([a, sp.k_rope], dim=0)
    return MLALayer(q=q[:, :-1], q_bias=q[:, -1], kv_a=kv_a[:, :-1], kv_a_bias=kv_a[:, -1], kv_b=kv_b, heads=H,
                    kv_rank=r, nope_dim=nope, rope_dim=rope, v_dim=vd, rope_heads=sp.rope_heads, alpha=alpha)


def convert_layer(w: AttnWeights, rope: RopeSpec, *, kv_rank: int, rope_dim: int, scale: float,
                  rope_keys: str = "shared", rope_method: str = "pca", gram: torch.Tensor | None = None,
                  factor_gram: torch.Tensor | None | str = "same", balanced: bool = True,
                  query_weighted: bool = True) -> MLALayer:
    """One source layer -> :class:`MLALayer` with a latent of ``kv_rank`` channels. ``scale``: the source's
    softmax scale (``head_dim**-0.5`` for most models); ``gram``: the input's second moment, used by the RoPE split
    and (unless ``factor_gram`` says otherwise: None for a weight SVD) by the joint low rank; None everywhere:
    weight-only. ``balanced``: K/V norm balancing; ``query_weighted``: see :func:`split_rope`."""
    sp = split_rope(w, rope, rope_dim, rope_keys=rope_keys, rope_method=rope_method, gram=gram,
                    query_weighted=query_weighted)
    fg = gram if isinstance(factor_gram, str) else factor_gram
    alpha = balance(sp.k_nope, sp.v, fg) if balanced else 1.0
    a, b = joint_factor(torch.cat([alpha * sp.k_nope, sp.v]), kv_rank, fg)
    return _assemble(sp, a, b, alpha, scale)


def full_rank(w: AttnWeights, rope: RopeSpec, *, rope_dim: int, scale: float, rope_keys: str = "shared",
              rope_method: str = "pca", gram: torch.Tensor | None = None) -> MLALayer:
    """The partial-RoPE intermediate: the same RoPE split with no low rank (the latent is every nope key and
    value row: ``kv_a = [K; V]``, ``kv_b`` a selection). A full-rank :func:`convert_layer` computes the same."""
    sp = split_rope(w, rope, rope_dim, rope_keys=rope_keys, rope_method=rope_method, gram=gram)
    m = torch.cat([sp.k_nope, sp.v])
    return _assemble(sp, m, torch.eye(m.shape[0], dtype=m.dtype, device=m.device), 1.0, scale)


def latent_norm_bound(layer: MLALayer, input_norm: float) -> float:
    """An upper bound of ``|c|`` (the latent, without anchor) for inputs of norm at most ``input_norm``:
    ``sigma_max(W_c) * input_norm + |b_c|``."""
    r = layer.kv_rank
    w, bias = layer.kv_a[:r], layer.kv_a_bias[:r]
    sigma = torch.linalg.matrix_norm(w, ord=2).item() if w.numel() else 0.0
    return sigma * input_norm + bias.norm().item()


def anchor_beta(norm_bound: float, tol: float = 1e-6) -> float:
    """The anchor level ``beta = bound / sqrt(2 tol)``: the relative error ``|c|^2/(2 beta^2)`` stays below ``tol``
    for every latent of norm below ``bound``."""
    if not tol > 0:
        raise ValueError(f"tol={tol!r}: expected a positive number")
    return max(norm_bound, 1e-6) / math.sqrt(2 * tol)


def add_anchor(layer: MLALayer, beta: float) -> MLALayer:
    """Add the anchor channel (see the module docstring): the latent grows from ``kv_rank`` to ``kv_rank + 1``
    channels, the new last one the constant ``beta`` (a bias on a zero row of ``kv_a_proj``, read by a zero column
    of ``kv_b_proj``), and ``kv_b_proj`` is scaled by ``beta / sqrt(kv_rank + 1)`` to read the RMS-normalised
    latent (``kv_a_layernorm`` with a unit weight). A budget of ``n`` cached latent numbers is therefore converted
    with ``kv_rank = n - 1`` data channels."""
    r = layer.kv_rank
    n = r + 1
    d = layer.kv_a.shape[1]
    zero = torch.zeros(1, d, dtype=layer.kv_a.dtype, device=layer.kv_a.device)
    kv_a = torch.cat([layer.kv_a[:r], zero, layer.kv_a[r:]])
    kv_a_bias = torch.cat([layer.kv_a_bias[:r], layer.kv_a_bias.new_tensor([beta]), layer.kv_a_bias[r:]])
    kv_b = torch.cat([layer.kv_b * (beta / math.sqrt(n)), layer.kv_b.new_zeros(layer.kv_b.shape[0], 1)], dim=1)
    return MLALayer(q=layer.q, q_bias=layer.q_bias, kv_a=kv_a, kv_a_bias=kv_a_bias, kv_b=kv_b, heads=layer.heads,
                    kv_rank=n, nope_dim=layer.nope_dim, rope_dim=layer.rope_dim, v_dim=layer.v_dim,
                    rope_heads=layer.rope_heads, alpha=layer.alpha)
