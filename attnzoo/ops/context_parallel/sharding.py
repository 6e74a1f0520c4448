"""How a sequence is cut across the ranks of a context-parallel group.

Two layouts (:data:`LAYOUTS`):

* ``"contiguous"``: rank ``r`` holds one run of positions, ranks in order (``torch.tensor_split``: the first
  ``n % world`` ranks hold one position more). A band pattern (sliding window) needs this layout: each rank's
  keys border its neighbours' (the halo exchange reads only those).
* ``"zigzag"``: the sequence is cut into ``2 * world`` chunks and rank ``r`` holds chunks ``r`` and
  ``2 * world - 1 - r`` (the "head-tail" load balancing of PyTorch's context parallel, and the zig-zag of
  ring-flash-attn). Under a causal mask every rank then has the same work: an early chunk, which attends to little,
  paired with a late one, which attends to much. With the contiguous layout the last rank does ``2 * world - 1``
  times the work of the first.

Lengths need not divide: chunks follow ``torch.tensor_split`` (sizes differ by at most one), so odd sequence and
shard lengths are fine. Every rank computes every rank's positions from ``(seq_len, world, layout)`` alone, so the
ring knows the size of each block it receives without asking.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ...errors import check_choice, check_positive_int, check_type

__all__ = ["LAYOUTS", "Sharding"]

LAYOUTS = ("zigzag", "contiguous")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``parts`` chunks of ``range(n)``, sized as ``torch.tensor_split`` sizes them."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass(frozen=True)
class Sharding:
    """A sequence of ``seq_len`` positions cut across ``world`` ranks in ``layout`` (see the module doc).

    >>> s = Sharding(10, 2, "zigzag")
    >>> s.spans(0), s.spans(1)
    (((0, 3), (8, 10)), ((3, 6), (6, 8)))
    """

    seq_len: int
    world: int
    layout: str = "zigzag"

    def __post_init__(self):
        check_positive_int("world", self.world)
        check_type("layout", self.layout, str, f"one of {', '.join(map(repr, LAYOUTS))}")
        check_choice("layout", self.layout, LAYOUTS)
        chunks = self.world * (2 if self.layout == "zigzag" else 1)
        check_type("seq_len", self.seq_len, int, "a positive integer")
        if self.seq_len < chunks:
            raise ValueError(
                f"seq_len={self.seq_len}: layout={self.layout!r} over world={self.world} ranks cuts "
                f"the sequence into {chunks} chunks; expected seq_len >= {chunks}"
            )

    @cached_property
    def _spans(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        if self.layout == "contiguous":
            return tuple((span,) for span in _split(self.seq_len, self.world))
        chunks = _split(self.seq_len, 2 * self.world)
        return tuple((chunks[r], chunks[2 * self.world - 1 - r]) for r in range(self.world))

    def spans(self, rank: int) -> tuple[tuple[int, int], ...]:
        """The ``(start, stop)`` position runs rank ``rank`` holds, in the order its local tensor holds them."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank}: expected 0 <= rank < world={self.world}")
        return self._spans[rank]

    def length(self, rank: int) -> int:
        """How many positions rank ``rank`` holds."""
        return sum(b - a for a, b in self.spans(rank))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Long ``[length(rank)]``: the global positions of rank ``rank``'s local tensor, in order."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.spans(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s part of the whole-sequence tensor ``x`` (sequence along ``dim``)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"the tensor has {x.shape[dim]} positions along dim {dim}, the sharding seq_len={self.seq_len}"
            )
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.spans(rank)], dim=dim)

    def unshard(self, parts: list[torch.Tensor], dim: int = 2) -> torch.Tensor:
        """The whole-sequence tensor from every rank's part (``parts[r]`` from rank ``r``), in position order."""
        if len(parts) != self.world:
            raise ValueError(f"got {len(parts)} parts for world={self.world} ranks")
        pieces = []
        for r, part in enumerate(parts):
            offset = 0
            for a, b in self.spans(r):
                pieces.append((a, part.narrow(dim, offset, b - a)))
                offset += b - a
        return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim=dim)
