"""ARR-COC: query-aware relevance scorers and a variable level-of-detail visual token budget for vision-language
models (docs/arrcoc.md).

* :func:`texture_array`: the 13-channel texture array (:mod:`.texture`);
* :class:`InformationScorer`, :class:`SalienceScorer`, :class:`CouplingScorer`, :class:`TensionBalancer` and
  :class:`RelevanceScorer` (all of them on a texture array) (:mod:`.scorers`);
* :class:`TokenBudgetAllocator` (:mod:`.allocator`): tokens per region, exactly the budget, monotone in relevance;
* :func:`encode_regions` (:mod:`.lod`): each region encoded by a VLM's vision tower at its own resolution, all
  regions of a batch in one packed sequence;
* :func:`plot_allocation` (:mod:`.plot`): the scores and the levels over the image.

The plug-in itself is ``attnzoo.patch(vlm, "arrcoc", budget=..., levels=...)`` (:mod:`attnzoo.patches.arrcoc`);
its baseline ``attnzoo.patch(vlm, "visual_topk", k=...)``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..variants.arrcoc import DEFAULT_LEVELS, SQUARE_LEVELS
from .allocator import TokenBudgetAllocator, grid_shape
from .scorers import (CouplingScorer, InformationScorer, RelevanceScorer, SalienceScorer, TensionBalancer, entropy,
                      region_descriptors, region_index, region_mean)
from .texture import CHANNEL_RANGES, CHANNELS, rgb_to_lab, texture_array

__all__ = ["texture_array", "CHANNELS", "CHANNEL_RANGES", "rgb_to_lab", "InformationScorer", "SalienceScorer",
           "CouplingScorer", "TensionBalancer", "RelevanceScorer", "TokenBudgetAllocator", "grid_shape", "entropy",
           "region_index", "region_mean", "region_descriptors", "DEFAULT_LEVELS", "SQUARE_LEVELS", "encode_regions",
           "plot_allocation"]

_LAZY = {"encode_regions": ".lod", "plot_allocation": ".plot"}  # these pull in transformers / matplotlib


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
