"""A model's learned absolute position table, and extending it in place (the Longformer recipe).

The adapter row names the table (``Adapter.positions``, e.g. BERT's and RoBERTa's
``embeddings.position_embeddings``). The table's reserved rows are read from the module
itself: an ``nn.Embedding`` with a ``padding_idx`` (RoBERTa, whose positions start at
``padding_idx + 1``) reserves ``padding_idx + 1`` rows; one without (BERT) none. The
weight mathematics is :func:`attnzoo.conversion.positions.extend_positions`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..conversion.positions import extend_positions, position_capacity
from .adapters import Adapter, supported_model_types

__all__ = ["PositionTable", "position_tables", "extend_position_tables"]


@dataclass
class PositionTable:
    root: nn.Module
    fqn: str

    @property
    def module(self) -> nn.Embedding:
        return self.root.get_submodule(self.fqn)

    @property
    def parent(self) -> nn.Module:
        path = self.fqn.rpartition(".")[0]
        return self.root.get_submodule(path) if path else self.root

    @property
    def rows(self) -> int:
        return self.module.num_embeddings

    @property
    def offset(self) -> int:
        pad = self.module.padding_idx
        return 0 if pad is None else int(pad) + 1

    @property
    def capacity(self) -> int:
        """Tokens the table serves (rows minus the reserved ones)."""
        return position_capacity(self.rows, self.offset)


def _types_with_positions() -> list[str]:
    from .adapters import ADAPTERS

    return sorted(t for a in ADAPTERS if a.positions for t in a.model_types)


def position_tables(model: nn.Module, adapter: Adapter) -> list[PositionTable]:
    """The learned absolute position tables of ``model`` (``ValueError`` when its architecture has none)."""
    if not adapter.positions:
        raise ValueError(f"max_positions: {adapter.name} models ({', '.join(adapter.model_types)}) have no learned "
                         f"absolute position table to extend; max_positions applies to "
                         f"{', '.join(_types_with_positions())} (omit it here)")
    found = [PositionTable(model, fqn) for fqn, m in model.named_modules()
             if fqn and isinstance(m, nn.Embedding) and re.search(r"(?:^|\.)" + adapter.positions + "$", fqn)]
    if not found:
        raise ValueError(f"max_positions: no position table matching {adapter.positions!r} in "
                         f"{type(model).__name__} (supported model types: {', '.join(supported_model_types())})")
    return found


def extend_position_tables(model: nn.Module, adapter: Adapter, max_positions: int) -> list[str]:
    """Extend every position table of ``model`` to serve ``max_positions`` tokens, in place (no-op when it
    already does), with the buffers sized by it (``position_ids``, ``token_type_ids``) and
    ``config.max_position_embeddings``. Returns one line per table changed."""
    notes = []
    for t in position_tables(model, adapter):
        rows = t.offset + max_positions
        old_rows = t.rows
        if old_rows == rows:
            continue
        old = t.module
        weight = extend_positions(old.weight.detach(), max_positions, t.offset)
        new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(t.parent, t.fqn.rpartition(".")[2], new)
        parent = t.parent
        for name, buf in list(parent.named_buffers(recurse=False)):
            if buf is None or buf.dim() != 2 or buf.shape[-1] != old_rows:
                continue
            if name == "position_ids":
                grown = torch.arange(rows, dtype=buf.dtype, device=buf.device).expand(1, -1)
            else:  # token_type_ids: zeros
                grown = torch.cat([buf, buf[:, :1].expand(-1, rows - old_rows)], dim=1)
            persistent = name not in parent._non_persistent_buffers_set
            parent.register_buffer(name, grown.contiguous() if name != "position_ids" else grown,
                                   persistent=persistent)
        notes.append(f"{t.fqn}: {old_rows} -> {rows} rows (the {old_rows - t.offset} learned rows tiled to "
                     f"{max_positions} positions" + (f"; {t.offset} reserved rows kept" if t.offset else "") + ")")
    config = getattr(model, "config", None)
    if notes and getattr(config, "max_position_embeddings", None) is not None:
        config.max_position_embeddings = position_tables(model, adapter)[0].rows
    return notes
