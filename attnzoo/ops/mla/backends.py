"""Backends of the latent-attention op (the absorbed MLA core).

* ``triton``: attnzoo's split-KV decode kernel (:mod:`.triton_decode`): one query token, the cache read once in
  place (``c`` and ``k_rope`` as they are stored), split along the sequence, one combine;
* ``dense``: :func:`attnzoo.ops.attention` over ``[c; k_rope]`` as ``Rh`` KV heads (q/k head dim ``R + Dr``,
  values ``c``: head dim ``R``), which serves any query length, masks and autograd (it copies the cache into
  ``[c; k_rope]`` for the call);
* ``eager``: :func:`~attnzoo.ops.mla.naive.latent_attention_reference`, the reference.
"""
from __future__ import annotations

from ..dense import attention
from ..dispatch import Backend
from .naive import absorbed_keys, latent_attention_reference

__all__ = ["BACKENDS"]


class DenseBackend(Backend):
    name = "dense"
    description = "attnzoo.ops.attention over [c; k_rope] (any length, masks, autograd; copies the cache per call)"

    def run(self, call):
        import torch

        q = torch.cat([call.q_lat, call.q_rope], dim=-1)
        k = absorbed_keys(call.c, call.k_rope)
        v = call.c.unsqueeze(1).expand(-1, call.rope_heads, -1, -1)
        return attention(q, k, v, causal=call.causal, mask=call.mask, key_padding_mask=call.key_padding_mask,
                         scale=call.scale)


class EagerBackend(Backend):
    name = "eager"
    description = "plain PyTorch over [c; k_rope] (float32 math for half inputs); the reference"

    def run(self, call):
        return latent_attention_reference(call.q_lat, call.q_rope, call.c, call.k_rope, scale=call.scale,
                                          causal=call.causal, mask=call.mask, key_padding_mask=call.key_padding_mask)


class TritonBackend(Backend):
    name = "triton"
    description = "attnzoo's split-KV Triton decode kernel (one query token; reads the latent cache in place)"

    def check(self, call):
        from .triton_decode import unavailable_reason

        return unavailable_reason(call)

    def run(self, call):
        from .triton_decode import latent_decode

        return latent_decode(call.q_lat, call.q_rope, call.c, call.k_rope, scale=call.scale,
                             key_padding_mask=call.key_padding_mask, mask=call.mask)


BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), DenseBackend(), EagerBackend())}
