"""Feature maps of the linear family: ``phi(x)`` for queries and keys ``[batch, heads, seq, head_dim]``.

Every map returns ``(features, log_scale)``: non-negative ``features [batch, heads, seq, f]`` and a per-row
log-scale ``[batch, heads, seq]`` (or None), the true feature row being ``features * exp(log_scale)``. The
exponential maps (FAVOR+, hedgehog) return rows divided by their largest entry and that maximum's log, so
that nothing overflows; :mod:`attnzoo.ops.linear` keeps the scales apart (see its key stabiliser).

* :func:`favor_features`: FAVOR+ positive random features (Performer), ``exp(w.x - |x|^2/2) / sqrt(m)``;
  :func:`orthogonal_gaussian` draws ``w`` (blocks of orthogonal rows with Gaussian norms), seeded.
* :class:`FeatureMap`: the learnable maps (one set of parameters per head): ``hedgehog``
  (``[exp(xW + b), exp(-(xW + b))]``, Zhang et al., ICLR'24), ``t2r`` (``relu(xW + b)``, Kasai et al.),
  ``performer`` (FAVOR+ with a learned projection, initialised orthogonal random), ``elu``
  (``elu(xW + b) + 1``, Katharopoulos et al. with a learned projection). ``W`` starts at the identity
  (``performer``: random orthogonal), ``b`` at 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.linear.favor import ExpMap, favor_feature_rows, favor_map, feature_rows_fit

__all__ = ["FEATURE_MAPS", "FeatureMap", "favor_features", "favor_features_torch", "orthogonal_gaussian", "feature_dim"]

FEATURE_MAPS = ("hedgehog", "t2r", "performer", "elu")


def feature_dim(kind: str, head_dim: int, features: int) -> int:
    """Width of ``kind``'s feature rows for heads of ``head_dim`` (``features``: the performer map's m)."""
    return {"hedgehog": 2 * head_dim, "t2r": head_dim, "elu": head_dim, "performer": features}[kind]


def orthogonal_gaussian(m: int, d: int, seed: int, draw: int = 0) -> torch.Tensor:
    """``[m, d]`` float32 rows: blocks of ``d`` orthogonal directions, each row scaled to the norm of a Gaussian
    vector (FAVOR+'s orthogonal random features). The same ``(seed, draw)`` gives the same rows everywhere."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(draw))
    blocks = []
    for _ in range(-(-m // d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        blocks.append(q.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def favor_features(x: torch.Tensor, projection: torch.Tensor, scale: float):
    """FAVOR+ ``phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * sqrt(scale)`` (so that
    ``E[phi(q).phi(k)] = exp(scale * q.k)``); ``projection [m, d]`` or ``[heads, m, d]``. Returns
    ``(exp(w.x' - t), t - |x'|^2 / 2 + log(1/sqrt(m)))`` per row, ``t = max_m w.x'`` (detached): the row's norm
    term, the same for all its features, rides in the log-scale (float32 for 16-bit x). On CUDA one kernel
    writes the ``[.., m]`` rows once (:func:`attnzoo.ops.linear.favor.favor_feature_rows`); elsewhere
    :func:`favor_features_torch`."""
    if feature_rows_fit(x, projection):
        return favor_feature_rows(x, projection, scale)
    return favor_features_torch(x, projection, scale)


def favor_features_torch(x: torch.Tensor, projection: torch.Tensor, scale: float):
    """:func:`favor_features` in PyTorch (any device and dtype; the kernel's reference): the GEMM, then one
    subtraction and one exponential over the ``[.., m]`` rows."""
    xs = x * math.sqrt(scale)
    p = projection.to(x.dtype)
    u = torch.einsum("bhnd,md->bhnm", xs, p) if p.dim() == 2 else torch.einsum("bhnd,hmd->bhnm", xs, p)
    top = u.amax(-1, keepdim=True).detach()
    ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    log = top.squeeze(-1).to(ct) - 0.5 * xs.to(ct).square().sum(-1) - 0.5 * math.log(p.shape[-2])
    return (u - top).exp_(), log


_INITIAL_GAIN = {"hedgehog": lambda d: -math.log(2 * d), "elu": lambda d: -math.log(d), "t2r": lambda d: 0.0,
                 "performer": lambda d: 0.0}


class FeatureMap(nn.Module):
    """A learnable feature map, one ``weight [heads, head_dim, out]`` (and ``bias [heads, out]``) per head;
    ``kind`` in :data:`FEATURE_MAPS`; ``features``/``seed``: the performer map's width and initial rows.

    ``gain=True`` (the keys' map) adds ``log_gain [heads]`` to every row's log-scale: the weight of the linear
    part against an exact-softmax window (it cancels without a window), initialised so that
    ``phi(q) . phi(k)`` is about ``exp(0) = 1`` for small inputs, as the window's weights are (hedgehog:
    ``-log(2 d)``, elu: ``-log(d)``; the role of LoLCATs' window factor)."""

    def __init__(self, kind: str, heads: int, head_dim: int, features: int = 64, scale: float = 1.0, seed: int = 0,
                 gain: bool = False):
        super().__init__()
        self.log_gain = nn.Parameter(torch.full((heads,), _INITIAL_GAIN[kind](head_dim))) if gain else None
        self.kind, self.scale = kind, scale
        if kind == "performer":
            rows = orthogonal_gaussian(features, head_dim, seed)
            self.weight = nn.Parameter(rows.unsqueeze(0).repeat(heads, 1, 1))  # [heads, m, d]
            self.bias = None
        else:
            self.weight = nn.Parameter(torch.eye(head_dim).unsqueeze(0).repeat(heads, 1, 1))  # [heads, d, d]
            self.bias = nn.Parameter(torch.zeros(heads, head_dim))
        self.out_features = feature_dim(kind, head_dim, features)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.weight.shape[0]}, features={self.out_features}"

    def forward(self, x: torch.Tensor):
        feats, log = self._features(x)
        if self.log_gain is None:
            return feats, log
        gain = self.log_gain.to(feats.dtype)[None, :, None].expand(feats.shape[:-1])
        return feats, gain if log is None else log + gain

    def exp_map(self):
        """This map as an :class:`attnzoo.ops.linear.favor.ExpMap` (the fused non-causal kernels), or None when
        it is not exponential (t2r, elu). ``log_gain`` is left out: a per-head constant, it cancels without a
        window (and a window is causal)."""
        if self.kind == "performer":
            return favor_map(self.weight, self.scale)
        if self.kind != "hedgehog":
            return None
        wt = self.weight.transpose(-1, -2)  # u = x W: rows of W^T
        return ExpMap(torch.cat([wt, -wt], -2), torch.cat([self.bias, -self.bias], -1))

    def _features(self, x: torch.Tensor):
        if self.kind == "performer":
            return favor_features(x, self.weight, self.scale)
        u = torch.einsum("bhnd,hde->bhne", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)[None, :, None]
        if self.kind == "t2r":
            return torch.relu(u), None
        if self.kind == "elu":
            return torch.nn.functional.elu(u) + 1, None
        top = u.abs().amax(-1, keepdim=True).detach()
        return torch.cat([(u - top).exp(), (-u - top).exp()], -1), top.squeeze(-1)
