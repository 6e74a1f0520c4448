"""The zoo: one file per family of attention modules, each registering its names.

Importing this package registers every built-in variant: every module of this folder is imported (a new family
file registers its names with no line here; the names below are the package's public exports).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .arrcoc import ArrcocConfig, RegionAttention, VisualTopKAttention, VisualTopKConfig
from .cache import Cache, KVCache, LatentCache, StateCache
from .config import RopeConfig, VariantConfig
from .dense import DenseAttention, DenseConfig, GQAConfig, MHAConfig, MQAConfig
from .mla import MLAAttention, MLAConfig, MLAOptions
from .reformer import LSHCache, ReformerAttention, ReformerConfig
from .rolling_cache import RollingKVCache
from .sparse import (BigBirdConfig, LongformerConfig, SlidingWindowConfig, SparseAttention, SparseConfig,
                     SparseFixedConfig, SparseStridedConfig)

__all__ = ["VariantConfig", "RopeConfig", "Cache", "KVCache", "LatentCache", "StateCache", "DenseAttention", "DenseConfig", "MHAConfig",
           "GQAConfig", "MQAConfig", "RollingKVCache", "SparseAttention", "SparseConfig", "SlidingWindowConfig",
           "LongformerConfig", "BigBirdConfig", "SparseStridedConfig", "SparseFixedConfig",
           "MLAOptions", "MLAConfig", "MLAAttention",
           "ArrcocConfig", "RegionAttention", "VisualTopKConfig", "VisualTopKAttention",
           "ReformerAttention", "ReformerConfig", "LSHCache"]
from .linear import (LinearAttention, LinearConfig, LinearStateCache, LinformerAttention, LinformerConfig,  # noqa: E402
                     PerformerConfig)

__all__ += ["LinearAttention", "LinearConfig", "LinearStateCache", "LinformerAttention", "LinformerConfig",
            "PerformerConfig"]

for _module in _pkgutil.iter_modules(__path__):  # every family registers itself, listed here or not
    _importlib.import_module(f"{__name__}.{_module.name}")
