"""Checkpoint conversion: weight mathematics as pure tensor functions, streaming safetensors I/O,
model cards. Used by :func:`attnzoo.patch` on live models and by ``attnzoo convert`` on checkpoints."""
from .heads import AttnWeights, RopeSpec, check_groups, valid_groups
from .methods import METHODS, Method, check_method, convert_kv_heads
from .pooling import mean_pool, pool_heads, repeat_heads, repeat_kv
from .svd import svd_pool

__all__ = ["AttnWeights", "RopeSpec", "check_groups", "valid_groups", "METHODS", "Method", "check_method",
           "convert_kv_heads", "mean_pool", "pool_heads", "repeat_heads", "repeat_kv", "svd_pool"]
