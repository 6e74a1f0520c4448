"""Checkpoint conversion, in two kinds of module:

* the weight mathematics of each method as pure tensor functions (:mod:`.heads`, :mod:`.layouts`,
  :mod:`.methods`, :mod:`.pooling`, :mod:`.svd`, :mod:`.kv_pca`, :mod:`.positions`), and the calibration pass
  that the data-aware methods read (:mod:`.calibration`: hooks on a live model, statistics per layer) and the streaming safetensors I/O
  (:mod:`.source`, :mod:`.safetensors_io`, :mod:`.streaming`): they import nothing of ``attnzoo.patches``, which
  uses them on live models;
* the ``attnzoo convert`` pipeline (:mod:`.pipeline`: streamed or through ``attnzoo.patch``, one
  :class:`~attnzoo.conversion.result.ConversionResult`, one staged output writer, one model card), which sits
  above ``attnzoo.patches`` and calls it.
"""
from .calibration import Calibration, CalibrationOptions, LayerStatistics, calibrate, gather_statistics
from .heads import AttnWeights, RopeSpec, check_groups, valid_groups
from .methods import METHODS, Method, check_method, convert_kv_heads
from .pooling import mean_pool, pool_heads, repeat_heads, repeat_kv
from .kv_pca import pca_pool
from .svd import svd_pool

__all__ = ["AttnWeights", "RopeSpec", "check_groups", "valid_groups", "METHODS", "Method", "check_method",
           "convert_kv_heads", "mean_pool", "pool_heads", "repeat_heads", "repeat_kv", "svd_pool",
           "pca_pool", "Calibration", "CalibrationOptions", "LayerStatistics", "calibrate", "gather_statistics"]
