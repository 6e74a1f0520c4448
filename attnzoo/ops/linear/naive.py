"""The float64 reference of the linear-attention op (the test oracle of :mod:`.chunked` and the Triton kernel).

The op's definition, written once here without any stabilisation. Features are non-negative maps of the
queries and keys, given as a tensor times a per-row log-scale (so that exponential maps such as FAVOR+ can be
passed without overflow): ``phi(q_i) = qf_i * exp(q_log_i)``, ``phi(k_j) = kf_j * exp(k_log_j)``. Query ``i``
weighs key ``j`` by

* ``exp(scale * q_i . k_j)`` when ``window > 0`` and ``0 <= i - j < window`` (exact softmax over the last
  ``window`` keys, the query's own included; causal only),
* ``phi(q_i) . phi(k_j)`` for every other key it sees (causal: ``j <= i``; bottom-right aligned when there
  are more keys than queries; padding keys are never seen),

and the output is ``sum_j w_ij v_j / sum_j w_ij``: one normaliser shared by both parts. A row with no key
(or a zero weight sum) gives 0.
"""
from __future__ import annotations

import math

import torch

__all__ = ["linear_attention_naive"]


def linear_attention_naive(qf, kf, v, *, causal: bool = False, key_padding_mask=None, q_log=None, k_log=None,
                           window: int = 0, q=None, k=None, scale: float | None = None) -> torch.Tensor:
    """``qf [b, hq, n, f]``, ``kf [b, hkv, m, f]``, ``v [b, hkv, m, dv]`` -> ``[b, hq, n, dv]`` in float64.

    ``q_log [b, hq, n]``, ``k_log [b, hkv, m]``: log-scales of the feature rows (None: 0). ``window``: with
    ``q [b, hq, n, d]``, ``k [b, hkv, m, d]`` and ``scale`` (None: ``1/sqrt(d)``), the exact-softmax window.
    """
    qf, kf, v = qf.double(), kf.double(), v.double()
    b, hq, n, _ = qf.shape
    dev = qf.device  # on the inputs' device (a float64 reference of GPU tensors runs there)
    hkv, m = kf.shape[1], kf.shape[2]
    g = hq // hkv
    phq = qf * (q_log.double().exp()[..., None] if q_log is not None else 1.0)
    phk = kf * (k_log.double().exp()[..., None] if k_log is not None else 1.0)
    i = torch.arange(n, device=dev)[:, None] + (m - n)
    j = torch.arange(m, device=dev)[None, :]
    keep = (j <= i) if causal else torch.ones(n, m, dtype=torch.bool, device=dev)
    win = (i - j >= 0) & (i - j < window) if window else torch.zeros(n, m, dtype=torch.bool, device=dev)
    if window and not causal:
        raise ValueError("the softmax window is causal (the last `window` keys)")
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=torch.float64, device=dev)
    for bi in range(b):
        kp = torch.ones(m, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask[bi].bool()
        for h in range(hq):
            w = phq[bi, h] @ phk[bi, h // g].T
            if window:
                sc = (1 / math.sqrt(q.shape[-1])) if scale is None else scale
                s = (q[bi, h].double() @ k[bi, h // g].double().T * sc).exp()
                w = torch.where(win, s, w)
            w = w * (keep & kp[None, :])
            den = w.sum(-1, keepdim=True)
            o = (w @ v[bi, h // g]) / torch.where(den > 0, den, torch.ones_like(den))
            out[bi, h] = torch.where(den > 0, o, torch.zeros_like(o))
    return out
