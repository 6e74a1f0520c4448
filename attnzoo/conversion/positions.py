"""Extending learned absolute position embeddings by copying (the Longformer recipe).

Beltagy et al., *Longformer* (2020), §5: to take RoBERTa from 512 to 4096 positions, "we
initialize [the new position embeddings] by copying the 512 position embeddings from RoBERTa
multiple times", which keeps the local structure the model learned at every 512-token
boundary but one. Hugging Face's conversion notebook does it on the table itself::

    new[k : k + step] = old[2:]      for k = 2, 2 + step, ...   (step = old rows - 2)

because RoBERTa's table starts with ``padding_idx + 1 = 2`` rows that no real token uses
(positions are counted from ``padding_idx + 1``). :func:`extend_positions` generalises it:
the first ``offset`` rows are kept as they are (0 for BERT, ``padding_idx + 1`` for RoBERTa),
and the remaining rows are tiled until the table has ``offset + max_positions`` rows (the
last copy is cut short when ``max_positions`` is not a multiple of the old capacity; the
notebook leaves its offset rows uninitialised, attnzoo copies them).
"""
from __future__ import annotations

import torch

from ..errors import check_positive_int

__all__ = ["position_capacity", "extend_positions"]


def position_capacity(rows: int, offset: int) -> int:
    """Tokens a table of ``rows`` position embeddings serves when the first ``offset`` rows are reserved."""
    return rows - offset


def extend_positions(weight: torch.Tensor, max_positions: int, offset: int = 0) -> torch.Tensor:
    """``[offset + max_positions, dim]``: ``weight``'s first ``offset`` rows, then its other rows tiled.

    Args:
        weight: the position table ``[rows, dim]``.
        max_positions: tokens the new table must serve (``>=`` the old capacity ``rows - offset``).
        offset: reserved rows at the start of the table (RoBERTa: ``padding_idx + 1``).

    Returns:
        a new tensor (``weight`` is not modified) of ``weight``'s dtype and device.
    """
    check_positive_int("max_positions", max_positions)
    check_positive_int("offset", offset, minimum=0)
    rows = weight.shape[0]
    old = position_capacity(rows, offset)
    if old < 1:
        raise ValueError(f"a position table of {rows} rows with {offset} reserved rows has no position to copy")
    if max_positions < old:
        raise ValueError(f"max_positions={max_positions}: smaller than the {old} positions the table already has; "
                         f"extending never truncates (expected max_positions >= {old})")
    body = weight[offset:]
    reps = -(-max_positions // old)
    tiled = body.repeat(reps, 1)[:max_positions]
    return torch.cat([weight[:offset], tiled], dim=0).clone()
