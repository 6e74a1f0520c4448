"""ARR-COC without a VLM: relevance and allocation of plain images for a query given as an example picture.

:func:`score_images` runs the texture array, the three scorers, the balancer and the allocator on RGB images.
The coupling scorer needs region features and a query in one space; without a vision tower both are the
tower-free descriptors of :func:`attnzoo.arrcoc.region_descriptors` (colour and texture statistics), the query's
computed over the whole query picture. Each descriptor dimension is standardised over the image's regions (and
the query with the same statistics), so the coupling measures what sets a region apart, not the average colour.
Used by :func:`attnzoo.arrcoc.plot_allocation` and by the query-localisation benchmark
(``attnzoo bench --variants arrcoc --sections quality``).
"""
from __future__ import annotations

import torch

from .allocator import TokenBudgetAllocator
from .scorers import RelevanceScorer, region_descriptors
from .texture import as_unit_rgb, texture_array

__all__ = ["score_images", "query_features"]


def query_features(images: torch.Tensor, query: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Region features ``[B, R, 18]`` of ``images`` and the query's ``[B, 18]`` (``query``: one RGB picture
    ``[3, h, w]`` for all images, or ``[B, 3, h, w]``), standardised over each image's regions."""
    feats = region_descriptors(texture_array(images), grid)
    q = query if query.dim() == 4 else query.unsqueeze(0)
    qf = region_descriptors(texture_array(q), 1)[:, 0].expand(feats.shape[0], -1)
    mean, std = feats.mean(1, keepdim=True), feats.std(1, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (feats - mean) / std, (qf - mean[:, 0]) / std[:, 0]


@torch.no_grad()
def score_images(images: torch.Tensor, query: torch.Tensor | None = None, *, grid: int = 2, budget: int = 576,
                 levels=None, temperature: float = 0.1, scorer: RelevanceScorer | None = None) -> dict:
    """Scores and levels of RGB ``images [B, 3, H, W]`` (uint8 or [0, 1]) for ``query`` (an example picture, or
    None: no coupling). Returns ``information``, ``salience``, ``coupling``, ``relevance`` and ``levels``
    (tokens per region), each ``[B, grid * grid]``."""
    images = as_unit_rgb(images)
    scorer = scorer if scorer is not None else RelevanceScorer()
    features = q = None
    if query is not None:
        features, q = query_features(images, as_unit_rgb(query if query.dim() == 4 else query.unsqueeze(0),
                                                          name="query"), grid)
    out = scorer(texture_array(images), grid, features, q)
    out["levels"] = TokenBudgetAllocator(budget, levels, temperature)(out["relevance"])
    return out
