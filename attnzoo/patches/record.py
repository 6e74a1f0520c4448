"""The patch as recorded in ``config.json`` under ``attnzoo``, and KV-cache accounting from it.

A non-native patch (attnzoo modules, or a subset of layers with other KV-head counts)
writes ``model.config.attnzoo``::

    {"version": "0.1.0", "variant": "gqa", "adapter": "gpt2",
     "options": {"groups": 2, "method": "mean", "kernel": "attnzoo"},
     "modules": {"transformer.h.0.attn": {"layer": 0, "heads": 4, "head_dim": 16,
                                          "kv_heads_before": 4, "kv_heads": 2, "mode": "swap"}, ...},
     "kv_layout": [[2, 16], [2, 16]]}

``save_pretrained`` writes it with the config; :func:`attnzoo.from_pretrained` reads it to
rebuild the structure. ``kv_layout`` lists ``[kv_heads, head_dim]`` for every attention
layer (patched or not), which is what :func:`attnzoo.kv_cache_bytes` needs.
"""
from __future__ import annotations

from typing import Any

from .. import kv as _kv

__all__ = ["RECORD_KEY", "get_record", "set_record", "kv_resolver", "install_kv_resolver"]

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


def kv_resolver(config, dtype) -> int | None:
    """Bytes/token for a config carrying an attnzoo record (None otherwise: the default formula applies)."""
    rec = get_record(config)
    if rec is None or "kv_layout" not in rec:
        return None
    per = sum(2 * int(kv) * int(hd) for kv, hd in rec["kv_layout"])
    return per * _kv._elem(dtype)


def install_kv_resolver() -> None:
    if kv_resolver not in _kv._RESOLVERS:
        _kv._RESOLVERS.append(kv_resolver)
