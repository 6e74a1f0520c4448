"""The conversion methods by name, and the one entry point :func:`convert_kv_heads`.

``patch()`` on a live model and ``attnzoo convert`` on a checkpoint both call
:func:`convert_kv_heads` on the same :class:`~attnzoo.conversion.heads.AttnWeights`, so
they produce identical tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import check_choice
from .calibration import LayerStatistics
from .heads import AttnWeights, RopeSpec, check_groups
from .kv_pca import pca_pool
from .pooling import mean_pool, repeat_kv
from .svd import svd_pool

__all__ = ["Method", "METHODS", "convert_kv_heads", "check_method"]


@dataclass(frozen=True)
class Method:
    """A way to initialise fewer KV heads. ``fn(weights, groups, rope, stats) -> weights``.
    ``needs_o``: reads and rewrites ``o_proj``; ``changes_q``: rewrites ``q_proj``;
    ``linear_keys``: needs keys that reach the scores linearly (no per-head k_norm / clipping);
    ``calibrated``: needs the layer's :class:`~attnzoo.conversion.calibration.LayerStatistics` (``stats``; the
    others get None), so a live model (``attnzoo convert`` loads it instead of streaming); ``mixed_values``: its
    calibration also gathers the attention-mixed value moments (``gather_statistics(..., mixed_values=True)``)."""

    name: str
    fn: Callable[[AttnWeights, int, RopeSpec, LayerStatistics | None], AttnWeights]
    description: str
    needs_o: bool = False
    changes_q: bool = False
    linear_keys: bool = False
    calibrated: bool = False
    mixed_values: bool = False


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("mean", lambda w, g, rope, stats: mean_pool(w, g),
           "mean-pool the K and V heads of each group, biases too (the GQA paper); Q and O unchanged"),
    Method("svd", lambda w, g, rope, stats: svd_pool(w, g, rope),
           "shared SVD basis per group weighted by the partner projections; per-head corrections folded "
           "into q_proj (RoPE-aware) and o_proj", needs_o=True, changes_q=True, linear_keys=True),
    Method("pca", pca_pool,
           "calibrated: per-frequency PCA of the measured keys (RoPE-commuting, weighted by the queries' energy) "
           "and PCA of the values (weighted by o_proj), corrections folded into q_proj and o_proj, similar heads "
           "grouped together; needs calibration data (calib)", needs_o=True, changes_q=True, linear_keys=True,
           calibrated=True, mixed_values=True),
]}


def check_method(method) -> Method:
    check_choice("method", method, METHODS)
    return METHODS[method]


def convert_kv_heads(w: AttnWeights, groups: int, method: str = "mean", rope: RopeSpec | None = None,
                     where: str = "", stats: LayerStatistics | None = None) -> AttnWeights:
    """Leave ``groups`` KV heads in layer ``w``.

    Fewer than now: ``method`` decides (see :data:`METHODS`; a calibrated one reads ``stats``, the layer's
    statistics from :func:`attnzoo.conversion.calibration.calibrate`). More than now (a multiple):
    each KV head is repeated, exactly, whatever the method. Equal: ``w`` unchanged.
    """
    m = check_method(method)
    check_groups(groups, w.heads, w.kv_heads, where)
    if groups == w.kv_heads:
        return w
    if groups > w.kv_heads:
        return repeat_kv(w, groups)
    if m.calibrated and stats is None:
        raise ValueError(f"method={m.name!r} needs calibration statistics of {where or 'the layer'}; "
                         "patch()/attnzoo convert gather them from the calib option")
    return m.fn(w, groups, rope or RopeSpec(), stats)
