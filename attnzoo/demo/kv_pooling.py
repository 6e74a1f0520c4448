"""MHA -> GQA conversion of Llama-family models for the demo: mean-pooling and an exact-reparametrised SVD.

LOCAL STAND-IN, TO BE REPLACED AT MERGE by ``attnzoo.patch(model, "gqa", groups=G, method=...)``
(issue 3, branch ``surgery``), which was not merged when the demo was written. Only
:func:`convert_gqa` is called from outside this file; swap its body for ``attnzoo.patch``.

Both methods return a *native* Hugging Face model (``config.num_key_value_heads = groups``),
loadable with plain ``transformers``. Layout: query head ``h`` reads KV head
``h // (heads // kv_heads)``; KV heads ``[g*m, (g+1)*m)`` merge into group ``g``.

* ``mean``: each group's K and V projections are the mean of its heads' (Ainslie et al., 2023).
* ``svd``: per group, a shared K/V projection plus per-head corrections folded exactly into the
  query and output projections, fitted to the attention inputs of ``calibration`` ids (their
  second moment ``C = E[x x^T]`` whitens the fit; without calibration ``C = I``):

  - V: query head ``h`` (reading KV head ``j``) contributes ``W_o,h W_v,j x``. The shared value
    rows ``Y`` are the top-``d`` right singular vectors of the stacked ``W_o,h W_v,j C^1/2`` of the
    group, and each head's ``o_proj`` columns become its best fit ``W_o,h W_v,j C^1/2 Y^T`` (exact
    when the group's value paths share a row space, e.g. identical heads or ``groups = kv_heads``).
  - K: RoPE rotates each pair of dims ``(i, i + d/2)`` as a complex number, so a correction that
    commutes with it is one complex scalar per frequency and head. Per frequency the group's
    whitened key rows get their best rank-1 fit ``u_j w`` weighted by the query energy that reads
    them; the shared key row is ``w`` and each query head's pair is multiplied by ``conj(u_j)``,
    which preserves ``q . k`` at every relative position.
"""
from __future__ import annotations

import math

import torch

from ..checkpoint_io import quiet_hf, update_metadata
from ..errors import check_choice

__all__ = ["METHODS", "convert_gqa", "meanpool_kv", "svd_value", "svd_key_rope"]

METHODS = ("mean", "svd")


def meanpool_kv(w: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """``[kv_heads*d, ...] -> [groups*d, ...]``: the mean of each group's heads (weights or biases)."""
    d = w.shape[0] // kv_heads
    m = kv_heads // groups
    return w.reshape(groups, m, d, *w.shape[1:]).mean(1).reshape(groups * d, *w.shape[1:])


def _sqrt_and_inv(cov: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^1/2, C^-1/2)`` of a symmetric PSD matrix, eigenvalues floored at ``eps * max``."""
    lam, q = torch.linalg.eigh(cov)
    lam = lam.clamp_min(eps * float(lam.max().clamp_min(1e-30)))
    return (q * lam.sqrt()) @ q.T, (q * lam.rsqrt()) @ q.T


def svd_value(b: torch.Tensor, m: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``b``: ``[n, D_out, D]``, each query head's value path ``W_o,h @ W_v,j(h) @ C^1/2``. Returns
    ``(y [d, D], x [n, D_out, d])`` minimising ``sum_h ||b_h - x_h @ y||``: the shared whitened value
    rows ``y`` (orthonormal) and each head's new output columns ``x_h``."""
    _, _, vh = torch.linalg.svd(b.reshape(-1, b.shape[-1]), full_matrices=False)
    y = vh[:d]
    return y, b @ y.T


def svd_key_rope(z: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group at one RoPE frequency: ``z`` ``[m, D]`` complex whitened key rows, ``energy`` ``[m]`` the
    query energy reading each. Returns ``(w [D], u [m])`` with ``z_j ~ u_j w``, the best fit weighted by
    the queries (``u`` scaled to mean 1, so identical heads give ``u = 1``)."""
    wts = energy.sqrt().clamp_min(1e-12)
    u, s, vh = torch.linalg.svd(z * wts[:, None], full_matrices=False)
    w, coef = s[0] * vh[0], u[:, 0] / wts
    c = coef.mean()
    if c.abs() < 1e-6 * coef.abs().mean():
        c = coef.abs().mean().to(coef.dtype)
    return c * w, coef / c


def _layer_svd(sd: dict, prefix: str, heads: int, kv_heads: int, groups: int, d: int, cov: torch.Tensor):
    m, r, half = kv_heads // groups, heads // kv_heads, d // 2
    for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"):
        if prefix + name in sd:
            raise ValueError(f"method='svd' does not handle attention biases ({prefix + name}); use method='mean'")
    dtype = sd[prefix + "q_proj.weight"].dtype
    wq = sd[prefix + "q_proj.weight"].double().reshape(heads, d, -1)
    wk = sd[prefix + "k_proj.weight"].double().reshape(kv_heads, d, -1)
    wv = sd[prefix + "v_proj.weight"].double().reshape(kv_heads, d, -1)
    wo = sd[prefix + "o_proj.weight"].double().reshape(-1, heads, d)
    s, s_inv = _sqrt_and_inv(cov)
    q_c = torch.complex(wq[:, :half] @ s, wq[:, half:] @ s)  # [heads, half, D] whitened query rows
    k_c = torch.complex(wk[:, :half] @ s, wk[:, half:] @ s)
    q_energy = (q_c.abs() ** 2).sum(-1)  # [heads, half]: E|q_h,i|^2 over the calibration inputs
    new_k, new_v = [], []
    for g in range(groups):
        members = range(g * m, (g + 1) * m)
        readers = [list(range(j * r, (j + 1) * r)) for j in members]
        k_rows = torch.zeros(half, wk.shape[-1], dtype=torch.complex128)
        for i in range(half):
            energy = torch.stack([q_energy[hs, i].sum() for hs in readers])
            w, u = svd_key_rope(k_c[list(members), i], energy)
            k_rows[i] = w
            for j, hs in enumerate(readers):
                for h in hs:  # q . conj(u k) = (q conj(u)) . conj(k): fold the correction into the query
                    q_c[h, i] = q_c[h, i] * u[j].conj()
        k_white = torch.cat([k_rows.real, k_rows.imag], 0)
        new_k.append(k_white @ s_inv)
        hs_all = [h for hs in readers for h in hs]
        b = torch.stack([wo[:, h] @ wv[h // r] @ s for h in hs_all])
        y, x = svd_value(b, m, d)
        v = y @ s_inv
        scale = wv[list(members)].norm() / (math.sqrt(m) * v.norm()).clamp_min(1e-30)
        new_v.append(v * scale)
        for h, xh in zip(hs_all, x):
            wo[:, h] = xh / scale
    q_rows = torch.cat([q_c.real, q_c.imag], 1) @ s_inv  # back from whitened coordinates
    sd[prefix + "q_proj.weight"] = q_rows.reshape(heads * d, -1).to(dtype)
    sd[prefix + "k_proj.weight"] = torch.cat(new_k).to(dtype)
    sd[prefix + "v_proj.weight"] = torch.cat(new_v).to(dtype)
    sd[prefix + "o_proj.weight"] = wo.reshape(wo.shape[0], heads * d).to(dtype)


@torch.no_grad()
def attention_input_covariance(model, calibration: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (float64) of the hidden states entering each ``self_attn`` over ``calibration`` ids."""
    sums: dict[str, list] = {}
    hooks = []

    def make_hook(name):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None).detach().double().reshape(-1, module.q_proj.in_features)
            acc = sums.setdefault(name, [0, 0])
            acc[0] = acc[0] + x.T @ x
            acc[1] += x.shape[0]
        return hook

    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            hooks.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        for i in range(0, calibration.shape[0], batch_size):
            model(input_ids=calibration[i:i + batch_size].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {name + ".": acc[0] / acc[1] for name, acc in sums.items()}


def _attention_layers(model) -> list[str]:
    """The state-dict prefix of each decoder layer's ``self_attn``."""
    return [name + "." for name, module in model.named_modules()
            if name.endswith("self_attn") and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def convert_gqa(model, groups: int, method: str = "mean", calibration: torch.Tensor | None = None):
    """A new Llama-family model with ``groups`` KV heads, converted from ``model`` (left unchanged).

    ``calibration``: token ids ``[n, seq]`` whose attention inputs weight the ``svd`` fit (None:
    unweighted, i.e. identity input covariance). ``mean`` ignores it.

    TO BE REPLACED by ``attnzoo.patch(model, "gqa", groups=groups, method=method)`` (issue 3).
    """
    from transformers import AutoModelForCausalLM

    check_choice("method", method, METHODS)
    cfg = model.config.get_text_config()
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or kv % groups:
        valid = [g for g in range(1, kv + 1) if kv % g == 0]
        raise ValueError(f"groups={groups!r}: must divide the model's {kv} KV heads; valid groups: {valid}")
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: found no self_attn module with q_proj/k_proj/v_proj/o_proj")
    covs = attention_input_covariance(model, calibration) if method == "svd" and calibration is not None else {}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for prefix in layers:
        if method == "mean":
            for name in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"):
                if prefix + name in sd:
                    sd[prefix + name] = meanpool_kv(sd[prefix + name], kv, groups)
        else:
            cov = covs.get(prefix, torch.eye(sd[prefix + "q_proj.weight"].shape[1], dtype=torch.float64))
            _layer_svd(sd, prefix, heads, kv, groups, d, cov)
    new_cfg = model.config.__class__.from_dict(model.config.to_dict())
    new_cfg.get_text_config().num_key_value_heads = groups
    with quiet_hf():
        new = AutoModelForCausalLM.from_config(new_cfg, dtype=next(model.parameters()).dtype)
    new.load_state_dict(sd, strict=True)
    patch = {"name": "gqa", "groups": groups, "method": method, "from_kv_heads": kv}
    if method == "svd":
        patch["calibration_tokens"] = int(calibration.numel()) if calibration is not None else 0
    update_metadata(new, patch=patch,
                    new_modules=["k_proj", "v_proj"])
    return new.eval() if not model.training else new
