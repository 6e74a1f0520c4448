"""Point-to-point exchanges between ring neighbours (``torch.distributed`` P2P: gloo and NCCL alike)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ring", "ring_of", "free_port"]


@dataclass(frozen=True)
class Ring:
    """This process's place in a context-parallel group: its rank, the group size and its neighbours' global
    ranks (P2P ops address global ranks)."""

    group: object
    rank: int
    world: int
    next: int  # global rank of (rank + 1) % world: where blocks go
    prev: int  # global rank of (rank - 1) % world: where blocks come from

    def exchange(
        self, send: list[torch.Tensor], recv: list[torch.Tensor], *, to_next: bool = True, tag: int = 0
    ) -> list:
        """Start sending ``send`` to the next rank and receiving ``recv`` (pre-allocated) from the previous one
        (``to_next=False``: the other way round). Returns the requests; :meth:`wait` them before reading
        ``recv`` or writing ``send``. Exchanges in flight together need distinct ``tag`` bases (one tag per
        tensor from there on): gloo matches messages by sender and tag."""
        dst, src = (self.next, self.prev) if to_next else (self.prev, self.next)
        ops = [dist.P2POp(dist.isend, t.contiguous(), dst, self.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, src, self.group, tag + i) for i, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests: list) -> None:
        for r in requests:
            r.wait()


def ring_of(group=None) -> Ring:
    """The :class:`Ring` of ``group`` (default: the whole world) for this process."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context-parallel attention needs torch.distributed initialised "
            "(torch.distributed.init_process_group, e.g. by torchrun or accelerate launch)"
        )
    g = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(g), dist.get_world_size(g)
    if rank < 0:
        raise ValueError("this process is not a member of the context-parallel group passed as group=")
    return Ring(
        g, rank, world, dist.get_global_rank(g, (rank + 1) % world), dist.get_global_rank(g, (rank - 1) % world)
    )


def free_port() -> int:
    """A free TCP port on this host, for a local process group's rendezvous (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
