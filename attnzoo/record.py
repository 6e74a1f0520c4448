"""The patch as recorded in ``config.json`` under ``attnzoo``: its one reader and writer.

A non-native patch (attnzoo modules, or a subset of layers with other KV-head counts)
writes ``model.config.attnzoo``::

    {"version": "0.1.0", "variant": "gqa", "adapter": "gpt2",
     "options": {"groups": 2, "method": "mean", "kernel": "attnzoo"},
     "modules": {"transformer.h.0.attn": {"layer": 0, "heads": 4, "head_dim": 16,
                                          "kv_heads_before": 4, "kv_heads": 2, "mode": "swap"}, ...},
     "kv_layout": [{"kv_heads": 2, "head_dim": 16}, {"kv_heads": 2, "head_dim": 16}]}

``save_pretrained`` writes it with the config; :func:`attnzoo.from_pretrained` reads it to
rebuild the structure. ``kv_layout`` holds one :class:`~attnzoo.kv.KVLayout` per attention layer
(patched or not), what it caches per token; the sliding windows that ``transformers``' caches apply come
from the config itself (``sliding_window``, ``layer_types``), so the record holds no window. Records of
attnzoo 0.1.0 wrote ``[kv_heads, head_dim]`` pairs; they are read the same.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RECORD_KEY", "PATCH_KEYS", "get_record", "set_record"]

RECORD_KEY = "attnzoo"


def get_record(config) -> dict[str, Any] | None:
    """The patch record, or None. ``config.attnzoo`` also carries other attnzoo metadata (e.g.
    ``pretraining_tokens`` and ``uptrain`` from :mod:`attnzoo.uptrain`): it is a patch record
    only when it names a ``variant``."""
    rec = getattr(config, RECORD_KEY, None) if not isinstance(config, dict) else config.get(RECORD_KEY)
    return rec if isinstance(rec, dict) and rec.get("variant") else None


PATCH_KEYS = ("version", "variant", "adapter", "options", "modules", "kv_layout")


def set_record(config, record: dict[str, Any]) -> None:
    """Write the patch record into ``config.attnzoo``, keeping attnzoo's other metadata there."""
    old = getattr(config, RECORD_KEY, None)
    other = {k: v for k, v in old.items() if k not in PATCH_KEYS} if isinstance(old, dict) else {}
    setattr(config, RECORD_KEY, {**other, **record})
