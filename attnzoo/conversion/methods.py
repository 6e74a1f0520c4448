"""The conversion methods by name, and the one entry point :func:`convert_kv_heads`.

``patch()`` on a live model and ``attnzoo convert`` on a checkpoint both call
:func:`convert_kv_heads` on the same :class:`~attnzoo.conversion.heads.AttnWeights`, so
they produce identical tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import check_choice
from .heads import AttnWeights, RopeSpec, check_groups
from .pooling import mean_pool, repeat_kv
from .svd import svd_pool

__all__ = ["Method", "METHODS", "convert_kv_heads", "check_method"]


@dataclass(frozen=True)
class Method:
    """A way to initialise fewer KV heads. ``fn(weights, groups, rope) -> weights``.
    ``needs_o``: reads and rewrites ``o_proj``; ``changes_q``: rewrites ``q_proj``;
    ``linear_keys``: needs keys that reach the scores linearly (no per-head k_norm / clipping)."""

    name: str
    fn: Callable[[AttnWeights, int, RopeSpec], AttnWeights]
    description: str
    needs_o: bool = False
    changes_q: bool = False
    linear_keys: bool = False


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("mean", lambda w, g, rope: mean_pool(w, g),
           "mean-pool the K and V heads of each group, biases too (the GQA paper); Q and O unchanged"),
    Method("svd", lambda w, g, rope: svd_pool(w, g, rope),
           "shared SVD basis per group weighted by the partner projections; per-head corrections folded "
           "into q_proj (RoPE-aware) and o_proj", needs_o=True, changes_q=True, linear_keys=True),
]}


def check_method(method) -> Method:
    check_choice("method", method, METHODS)
    return METHODS[method]


def convert_kv_heads(w: AttnWeights, groups: int, method: str = "mean", rope: RopeSpec | None = None,
                     where: str = "") -> AttnWeights:
    """Leave ``groups`` KV heads in layer ``w``.

    Fewer than now: ``method`` decides (see :data:`METHODS`). More than now (a multiple):
    each KV head is repeated, exactly, whatever the method. Equal: ``w`` unchanged.
    """
    m = check_method(method)
    check_groups(groups, w.heads, w.kv_heads, where)
    if groups == w.kv_heads:
        return w
    if groups > w.kv_heads:
        return repeat_kv(w, groups)
    return m.fn(w, groups, rope or RopeSpec())
