"""What differs between the ``transformers`` versions attnzoo supports (the range in pyproject.toml),
in one place.

transformers 5.25 renamed the KV cache's keyword and output field from ``past_key_values`` to
``cache`` (the old keyword still works on model ``forward`` with a FutureWarning until 5.40, but an
attention module is called with ``cache=`` only). attnzoo reads and passes the cache through the
helpers below and never names either spelling elsewhere.
"""
from __future__ import annotations

import inspect
from typing import Any

__all__ = ["LAYER_CACHE_KWARGS", "layer_cache", "model_cache_kwarg", "output_cache", "enable_activation_checkpointing"]

# the keywords transformers' layers pass an attention module its cache under, newest first
# (gpt_neox's layers still say ``layer_past``)
LAYER_CACHE_KWARGS = ("cache", "past_key_values", "layer_past", "past_key_value")


def layer_cache(kwargs: dict[str, Any]):
    """The ``transformers`` ``Cache`` an attention module was called with, or None."""
    for name in LAYER_CACHE_KWARGS:
        got = kwargs.get(name)
        if got is not None:
            return got
    return None


_KWARG: dict[type, str] = {}


def model_cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its cache under: ``"cache"`` (transformers >= 5.25) or
    ``"past_key_values"``."""
    cls = type(model)
    if cls not in _KWARG:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _KWARG[cls]


def output_cache(output):
    """The cache a model's output carries (``output.cache`` or ``output.past_key_values``), or None."""
    for name in ("cache", "past_key_values"):
        got = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if got is not None:
            return got
    return None


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of each block: ``activation_checkpointing_enable`` where it exists
    (transformers >= 5.2x; ``gradient_checkpointing_enable`` is its deprecated alias there), else the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
