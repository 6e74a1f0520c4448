"""``latent_attention``: the absorbed MLA core on the fastest backend that serves the call.

Order: ``triton`` (split-KV decode, CUDA; one query token, no grad) then ``dense`` (:func:`attnzoo.ops.attention`)
then ``eager``. The choice is remembered per call signature (:class:`~attnzoo.ops.dispatch.Dispatcher`);
``use_latent_backend("eager")`` or ``backend=...`` force one.
"""
from __future__ import annotations

import threading

import torch

from ..dispatch import Decision, Dispatcher
from .backends import BACKENDS
from .call import LatentCall

__all__ = ["latent_attention", "explain_latent", "use_latent_backend", "last_latent_decision", "ORDER"]

ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "dense", "eager"), "cpu": ("dense", "eager")}
_OP = Dispatcher("latent_attention", BACKENDS, ORDER, ("dense", "eager"))
_local = threading.local()


def use_latent_backend(*names: str):
    """Force the latent-attention op inside the block onto ``names`` (tried in order, no fallback)."""
    return _OP.use(*names)


def latent_attention(q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, *,
                     scale: float, causal: bool = False, mask: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None, backend: str | tuple[str, ...] | None = None
                     ) -> torch.Tensor:
    """softmax(([q_lat; q_rope] · [c; k_rope]ᵀ) · scale) c, per query head.

    Args:
        q_lat: ``[batch, heads, q_len, kv_rank]``: the no-RoPE queries folded through ``w_kb``
            (:func:`~attnzoo.ops.mla.naive.absorb_query`).
        q_rope: ``[batch, heads, q_len, rope_dim]`` after RoPE.
        c: ``[batch, k_len, kv_rank]``: the cached latent (after ``kv_a_layernorm``); strided views are read in place.
        k_rope: ``[batch, k_len, rope_keys, rope_dim]`` after RoPE; head ``h`` reads rope key
            ``h // (heads // rope_keys)``.
        scale: the softmax scale (MLA: ``1/sqrt(nope_dim + rope_dim)``, not of ``kv_rank``).
        causal, mask, key_padding_mask: as :func:`attnzoo.ops.attention` (causal is bottom-right aligned).

    Returns:
        ``o_lat [batch, heads, q_len, kv_rank]`` in the inputs' dtype (then
        :func:`~attnzoo.ops.mla.naive.absorbed_output` applies ``w_vb``).
    """
    call = LatentCall.build(q_lat, q_rope, c, k_rope, scale=scale, causal=causal, mask=mask,
                            key_padding_mask=key_padding_mask)
    out, decision = _OP.run(call, backend)
    _local.last = decision
    return out


def explain_latent(q_lat, q_rope, c, k_rope, **kwargs) -> Decision:
    """Which backend serves this call and why the others do not (probing afresh, without grad)."""
    call = LatentCall.build(q_lat, q_rope, c, k_rope, **{k: v for k, v in kwargs.items() if k != "backend"})
    with torch.no_grad():
        return _OP.explain(call, kwargs.get("backend"))


def last_latent_decision() -> Decision | None:
    """The :class:`Decision` of the last :func:`latent_attention` call on this thread."""
    return getattr(_local, "last", None)
