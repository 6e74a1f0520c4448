"""One attention site of a live Llama-family model -> :class:`~attnzoo.conversion.mla.MLALayer` (the maths are in
:mod:`attnzoo.conversion.mla`; this reads the site's weights, RoPE, softmax scale and calibration moments)."""
from __future__ import annotations

import torch

from ...conversion.mla import MLALayer, convert_layer
from ...errors import UnsupportedArchitectureError
from ..sites import Site

__all__ = ["METHODS", "source_scale", "check_site", "convert_site", "rope_inv_freq"]

#: ``method`` -> (rope split, calibrated RoPE split, calibrated low rank, K/V balancing, query-weighted RoPE PCA)
METHODS = {
    "pca": ("pca", True, True, True, True),
    "svd": ("pca", False, False, True, True),
    "transmla": ("pca", True, True, True, False),
    "mha2mla": ("norm", True, False, False, False),
}
METHOD_HELP = ("'transmla' (default): TransMLA's recipe on calibration data: rope keys by a complex PCA of the keys "
               "across KV heads per frequency (RoRoPE; FreqFold when rope_dim < the rotary dims), then K/V norms "
               "balanced and a joint activation PCA of [K_nope; V]; 'pca': the same with the rope PCA weighted by "
               "the queries (minimises the score error; better on the built-in model, worse on SmolLM2-135M); "
               "'svd': no data (the same on the weights, a joint SVD); 'mha2mla': MHA2MLA's recipe (partial RoPE by "
               "q.k 2-norm contribution on calibration data, joint SVD of the weights); measured in "
               "docs/mla-conversion.md")


def source_scale(site: Site) -> float:
    """The source's softmax scale (the HF module's ``scaling``, else ``head_dim**-0.5``)."""
    s = getattr(site.module, "scaling", None)
    return float(s) if isinstance(s, (int, float)) else site.head_dim ** -0.5


def check_site(site: Site) -> None:
    """Raise when MLA cannot take this layer's keys through a linear latent."""
    a, config = site.adapter, site.config
    why = a.unsupported(config) or a.linear_keys(config)
    if why:
        raise UnsupportedArchitectureError(f"{site.fqn}: mla conversion needs keys that are a linear map of the "
                                           f"layer input (the latent is linear), but {why}")
    if site.rope().rotary_dim == 0:
        raise UnsupportedArchitectureError(f"{site.fqn}: the {a.name} attention has no rotary embedding; MLA's "
                                           "decoupled rope keys need RoPE")


def rope_inv_freq(site: Site) -> torch.Tensor:
    """The source's inverse frequencies per rotated pair (after its RoPE scaling), from the model's rotary
    module, else from theta."""
    for m in site.root.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.numel() == site.rope().rotary_dim // 2 and "Rotary" in type(m).__name__:
            return inv.detach().double().cpu()
    from ...ops.rope import inv_frequencies
    from ..adapters import rope_theta_of

    return inv_frequencies(site.rope().rotary_dim, rope_theta_of(site.config)).double()


def convert_site(site: Site, *, kv_rank: int, rope_dim: int, rope_keys: str, method: str,
                 gram: torch.Tensor | None) -> MLALayer:
    """The site as an :class:`MLALayer` with ``kv_rank`` data channels. ``gram``: the input's second moment
    ``[dim+1, dim+1]`` (calibrated methods), else None."""
    check_site(site)
    rope_method, rope_cal, factor_cal, balanced, weighted = METHODS[method]
    return convert_layer(site.read(), site.rope(), kv_rank=kv_rank, rope_dim=rope_dim, scale=source_scale(site),
                         rope_keys=rope_keys, rope_method=rope_method, gram=gram if rope_cal else None,
                         factor_gram=gram if factor_cal else None, balanced=balanced, query_weighted=weighted)
