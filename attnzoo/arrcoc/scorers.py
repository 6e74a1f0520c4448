"""ARR-COC's three relevance scorers and the tension balancer that combines them.

Each scorer is an ``nn.Module`` giving every region of an image a score in [0, 1], ``[B, R]``; regions are the
cells of a ``grid x grid`` partition (:func:`region_index`; row-major, region ``r = row * grid + col``):

* :class:`InformationScorer`: Shannon entropy of the region's histogram of a texture channel (lightness by
  default), over a proper probability distribution (counts / pixels), / ``ln(bins)``;
* :class:`SalienceScorer`: feature magnitude / (1 + eccentricity), a centre bias, averaged over the region and
  divided by the image's most salient region;
* :class:`CouplingScorer`: cosine between each region's feature vector and the query's, mapped to [0, 1] as
  ``(1 + cos) / 2`` (a vector and itself: 1); an optional learned projection, identity at start;
* :class:`TensionBalancer`: three opponent pairs (information vs salience 0.5, coupling vs information 0.6,
  coupling vs salience 0.5, the seed's weights, as parameters) each resolved by :meth:`TensionBalancer._navigate`,
  averaged into a relevance in [0, 1].

:class:`RelevanceScorer` runs the lot on a texture array (:func:`attnzoo.arrcoc.texture_array`).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..errors import check_positive_int
from .texture import CHANNEL_RANGES, CHANNELS

__all__ = ["region_index", "region_mean", "region_descriptors", "entropy", "InformationScorer", "SalienceScorer",
           "CouplingScorer", "TensionBalancer", "RelevanceScorer"]


def region_index(height: int, width: int, grid: int, device=None) -> torch.Tensor:
    """``[H, W]`` long: the region of each pixel in a ``grid x grid`` partition (row ``i`` of regions spans pixel
    rows ``floor(i H / grid)`` to ``floor((i + 1) H / grid) - 1``; likewise columns)."""
    check_positive_int("grid", grid)
    if height < grid or width < grid:
        raise ValueError(f"grid={grid}: an image of {height}x{width} pixels cannot be cut into {grid}x{grid} regions")
    return _region_index(height, width, grid, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _region_index(height: int, width: int, grid: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    return rows[:, None] * grid + cols[None, :]


@functools.lru_cache(maxsize=64)
def _separable(height: int, width: int, grid: int, dtype: torch.dtype, device: torch.device):
    """The region sums of an uneven partition as ``rows @ x @ cols``: ``rows [grid, H]`` and ``cols [W, grid]``
    (0/1), and ``1 / pixels`` per region ``[grid, grid]``."""
    r = torch.arange(height) * grid // height
    c = torch.arange(width) * grid // width
    rows = (r[None, :] == torch.arange(grid)[:, None]).to(torch.float64)
    cols = (c[:, None] == torch.arange(grid)[None, :]).to(torch.float64)
    inv = 1 / (rows.sum(1)[:, None] * cols.sum(0)[None, :])
    return tuple(t.to(device=device, dtype=dtype) for t in (rows, cols, inv))


def region_mean(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean of ``x [B, C, H, W]`` over each region -> ``[B, R, C]``.

    One reduction when ``grid`` divides the image (a reshape and a mean); else two small matrix products with
    the 0/1 row and column memberships of the partition (sums in the input's precision; a process that enables
    TF32 matmuls rounds these). Neither reads data on the host."""
    b, c, h, w = x.shape
    region_index(h, w, grid)  # checks the grid fits the image
    if h % grid == 0 and w % grid == 0:
        means = x.reshape(b, c, grid, h // grid, grid, w // grid).mean((3, 5))
    else:
        rows, cols, inv = _separable(h, w, grid, x.dtype, x.device)
        means = (rows @ x @ cols) * inv
    return means.reshape(b, c, grid * grid).transpose(1, 2)


#: The appearance channels :func:`region_descriptors` summarises (position channels excluded).
_APPEARANCE = ("r", "g", "b", "L", "a", "b_", "gx", "gy", "contrast")


def region_descriptors(texture: torch.Tensor, grid: int) -> torch.Tensor:
    """A tower-free feature vector per region for :class:`CouplingScorer`: mean and standard deviation of the
    appearance channels (RGB, CIELAB, |Sobel|, contrast) -> ``[B, R, 18]``."""
    idx = [CHANNELS.index(c) for c in _APPEARANCE]
    x = texture[:, idx]
    x = torch.cat([x[:, :6], x[:, 6:8].abs(), x[:, 8:]], 1)
    mean = region_mean(x, grid)
    var = (region_mean(x * x, grid) - mean * mean).clamp_min(0)
    return torch.cat([mean, var.sqrt()], -1)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy ``-sum p ln p`` (nats; ``0 ln 0 = 0``) of probability distributions along ``dim``.

    ``p`` must be a distribution (non-negative, summing to 1 along ``dim``): the seed applied the formula to
    raw feature values; normalise counts first (:class:`InformationScorer` does)."""
    if p.numel() and (p.min() < 0 or not torch.allclose(p.sum(dim), torch.ones((), dtype=p.dtype, device=p.device),
                                                          atol=1e-5)):
        raise ValueError("entropy(p): p must be probability distributions along dim (non-negative, summing to 1); "
                         "divide counts by their total first")
    return _entropy(p, dim)


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim)  # xlogy(0, 0) = 0


@functools.lru_cache(maxsize=64)
def _channel_bins(channels: tuple[str, ...], bins: int, dtype: torch.dtype, device: torch.device):
    """Device constants of :meth:`InformationScorer.histograms`: the channels' indices, and ``scale``/``shift``
    ``[1, K, 1]`` mapping a value to its (fractional) bin, ``(v - lo) / (hi - lo) * bins``."""
    idx = torch.tensor([CHANNELS.index(c) for c in channels], device=device)
    lo = torch.tensor([CHANNEL_RANGES[c][0] for c in channels], dtype=torch.float64)
    hi = torch.tensor([CHANNEL_RANGES[c][1] for c in channels], dtype=torch.float64)
    scale = bins / (hi - lo)
    return idx, scale.view(1, -1, 1).to(device, dtype), (-lo * scale).view(1, -1, 1).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _channel_offsets(channels: int, regions: int, bins: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(channels, device=device) * (regions * bins)).view(1, -1, 1)


@functools.lru_cache(maxsize=64)
def _salience_channels(device: torch.device) -> torch.Tensor:
    return torch.tensor([CHANNELS.index(c) for c in ("gx", "gy", "contrast", "ecc")], device=device)


class InformationScorer(nn.Module):
    """Information content of each region: the entropy of its histogram of ``channels`` (default lightness) in
    ``bins`` bins over each channel's documented range, / ``ln(bins)`` (so in [0, 1]); averaged over channels."""

    def __init__(self, bins: int = 32, channels: tuple[str, ...] = ("L",)):
        super().__init__()
        check_positive_int("bins", bins, minimum=2)
        for c in channels:
            if c not in CHANNELS:
                raise ValueError(f"channels: {c!r} is not a texture channel; valid: {', '.join(CHANNELS)}")
        self.bins, self.channels = bins, tuple(channels)

    def histograms(self, texture: torch.Tensor, grid: int) -> torch.Tensor:
        """Counts ``[B, len(channels), R, bins]``: one scatter-add over every channel and region (no host read)."""
        b, _, h, w = texture.shape
        r, k = grid * grid, len(self.channels)
        region = region_index(h, w, grid, texture.device).flatten()
        idx, scale, shift = _channel_bins(self.channels, self.bins, texture.dtype, texture.device)
        v = texture.index_select(1, idx).flatten(2)  # [B, K, HW]
        bin_ = torch.addcmul(shift, v, scale).floor_().clamp_(0, self.bins - 1).long()
        flat = (_channel_offsets(k, r, self.bins, texture.device) + region * self.bins) + bin_  # [B, K, HW]
        counts = texture.new_zeros(b, k * r * self.bins)
        counts.scatter_add_(1, flat.flatten(1), texture.new_ones(()).expand(b, flat.shape[1] * flat.shape[2]))
        return counts.view(b, k, r, self.bins)

    def forward(self, texture: torch.Tensor, grid: int) -> torch.Tensor:
        counts = self.histograms(texture, grid)
        p = counts / counts.sum(-1, keepdim=True)
        return (_entropy(p) / math.log(self.bins)).mean(1)


class SalienceScorer(nn.Module):
    """Salience of each region: per pixel the feature magnitude ``|(gx, gy, contrast)| / sqrt(3)`` (in [0, 1])
    divided by ``1 + centre_bias * eccentricity`` (the seed's ``magnitude / (1 + eccentricity)`` at
    ``centre_bias=1``), averaged over the region, then divided by the image's largest region value (so the most
    salient region scores 1; an image without features, below 1e-6, scores about 0 everywhere)."""

    def __init__(self, centre_bias: float = 1.0):
        super().__init__()
        if not isinstance(centre_bias, (int, float)) or centre_bias < 0:
            raise ValueError(f"centre_bias={centre_bias!r}: expected a float >= 0")
        self.centre_bias = float(centre_bias)

    def forward(self, texture: torch.Tensor, grid: int) -> torch.Tensor:
        feats = texture.index_select(1, _salience_channels(texture.device))  # gx, gy, contrast, ecc
        magnitude = torch.linalg.vector_norm(feats[:, :3], dim=1, keepdim=True) / math.sqrt(3)
        s = region_mean(magnitude / (1 + self.centre_bias * feats[:, 3:]), grid)[..., 0]
        return s / s.amax(-1, keepdim=True).clamp_min(1e-6)


class CouplingScorer(nn.Module):
    """Coupling of each region with the query: ``(1 + cos(P f_r, P q)) / 2``, ``f_r`` the region's features
    ``[B, R, D]``, ``q`` the query's ``[B, D]``; ``P`` is the identity, or with ``dim`` given a learned square
    projection initialised to the identity. A vector and itself score 1, opposite vectors 0."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        check_positive_int("dim", dim, allow_none=True)
        self.proj = None
        if dim is not None:
            self.proj = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim))

    def cosine(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or query.dim() != 2 or features.shape[0] != query.shape[0] \
                or features.shape[-1] != query.shape[-1]:
            raise ValueError(f"features {tuple(features.shape)} and query {tuple(query.shape)}: expected "
                             "[batch, regions, dim] and [batch, dim]")
        if self.proj is not None:
            features, query = self.proj(features), self.proj(query)
        return torch.cosine_similarity(features, query[:, None, :], dim=-1, eps=1e-12)

    def forward(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return ((1 + self.cosine(features, query)) / 2).clamp(0, 1)


class TensionBalancer(nn.Module):
    """Relevance from the three scores by opponent processing: three pairs, each navigated by
    :meth:`_navigate` with its weight (a parameter, the seed's default), averaged.

    ``relevance = mean(navigate(info, salience, w_is), navigate(coupling, info, w_ci),
    navigate(coupling, salience, w_cs))``, in [0, 1] when the scores are."""

    def __init__(self, info_salience: float = 0.5, coupling_info: float = 0.6, coupling_salience: float = 0.5):
        super().__init__()
        for name, w in (("info_salience", info_salience), ("coupling_info", coupling_info),
                        ("coupling_salience", coupling_salience)):
            if not isinstance(w, (int, float)) or not 0 <= w <= 1:
                raise ValueError(f"{name}={w!r}: expected a weight in [0, 1]")
        self.info_salience = nn.Parameter(torch.tensor(float(info_salience)))
        self.coupling_info = nn.Parameter(torch.tensor(float(coupling_info)))
        self.coupling_salience = nn.Parameter(torch.tensor(float(coupling_salience)))

    @staticmethod
    def _navigate(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Resolve the tension between opposing scores ``a`` and ``b``: the point ``weight`` of the way towards
        ``a``, i.e. ``w a + (1 - w) b`` with ``w = clamp(weight, 0, 1)``.

        A convex combination: monotone in both scores, in [0, 1] when they are, ``a`` alone at ``w = 1`` and
        ``b`` alone at 0; differentiable in the weight (the clamp keeps a learned weight meaningful). (The seed
        called ``_navigate`` without defining it.)"""
        w = weight.clamp(0, 1)
        return w * a + (1 - w) * b

    def forward(self, information: torch.Tensor, salience: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
        # the three pairs at once: [3, ...] stacks, one _navigate
        a = torch.stack([information, coupling, coupling])
        b = torch.stack([salience, information, salience])
        w = torch.stack([self.info_salience, self.coupling_info, self.coupling_salience])
        pairs = self._navigate(a, b, w.view(3, *([1] * information.dim())))
        return pairs.sum(0) / 3


class RelevanceScorer(nn.Module):
    """The three scorers and the balancer on a texture array: ``forward(texture, grid, features=None,
    query=None)`` -> dict ``information``, ``salience``, ``coupling`` and ``relevance``, each ``[B, R]``.

    ``features [B, R, D]`` and ``query [B, D]`` feed the coupling scorer (in the VLM plug-in: the tower's
    projected tokens pooled per region, and the mean embedding of the prompt's text tokens); without a query the
    coupling is 0.5 everywhere (neutral)."""

    def __init__(self, *, bins: int = 32, centre_bias: float = 1.0, coupling_dim: int | None = None,
                 weights: tuple[float, float, float] = (0.5, 0.6, 0.5)):
        super().__init__()
        self.information = InformationScorer(bins)
        self.salience = SalienceScorer(centre_bias)
        self.coupling = CouplingScorer(coupling_dim)
        self.balancer = TensionBalancer(*weights)

    def forward(self, texture: torch.Tensor, grid: int, features: torch.Tensor | None = None,
                query: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        info = self.information(texture, grid)
        sal = self.salience(texture, grid)
        if query is None:
            coup = torch.full_like(info, 0.5)
        else:
            coup = self.coupling(features.to(info.dtype), query.to(info.dtype))
        return {"information": info, "salience": sal, "coupling": coup, "relevance": self.balancer(info, sal, coup)}
