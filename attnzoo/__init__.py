"""attnzoo: attention model surgery for PyTorch and Hugging Face models.

Public API (see docs/ and DESIGN): :func:`list_variants`, :func:`create`, :func:`register`,
:func:`kv_cache_bytes`, :func:`patch` (with :class:`PatchReport`), :func:`from_pretrained`,
:func:`plot_pattern`, and the functional ops in :mod:`attnzoo.ops`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .errors import (AttnzooError, BackendUnavailableError, NoMatchingModuleError, UnknownVariantError,
                     UnsupportedArchitectureError)
from .kv import kv_cache_bytes
from .patches import (GQA, MHA, MQA, BigBird, Longformer, PatchConfig, PatchReport, SlidingWindow, from_pretrained,
                      patch)
from .plot import plot_pattern, plot_zoo
from .registry import create, list_variants, register

__all__ = ["__version__", "ops", "create", "list_variants", "register", "kv_cache_bytes", "patch", "PatchReport",
           "PatchConfig", "GQA", "MQA", "MHA", "SlidingWindow", "Longformer", "BigBird",
           "from_pretrained", "plot_pattern", "plot_zoo", "AttnzooError",
           "BackendUnavailableError", "NoMatchingModuleError", "UnknownVariantError", "UnsupportedArchitectureError"]
