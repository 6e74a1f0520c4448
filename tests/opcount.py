"""Counting the aten ops (and the ops that read device data on the host) of a call, on any device: the CPU proxy
for a call's kernel launches and host syncs (``TorchDispatchMode``; views included, as they cost host time)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops that read tensor data on the host (a sync on CUDA) or make a tensor from host data (a copy to the device)
HOST_READS = (
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "bincount",
    "lift_fresh",
    "lift_fresh_copy",
)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: f()`` -> ``c.ops`` (Counter of op names), ``c.total``, ``c.kernels``,
    ``c.host_reads``."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.host_reads: Counter = Counter()
        self.views = 0  # ops that only make a view (no kernel on a GPU, host time only)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.views += bool(getattr(func, "is_view", False)) or name in ("detach", "alias", "unbind", "split")
        if (
            name in HOST_READS
            or (
                name == "index"
                and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                )
            )
            or (
                name == "repeat_interleave"
                and kwargs.get("output_size") is None
                and isinstance(args[0], torch.Tensor)
                and len(args) == 1
            )
        ):
            self.host_reads[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that are not views: about the kernel launches on a GPU."""
        return self.total - self.views


def count_ops(fn, *args, **kwargs) -> OpCounter:
    with torch.no_grad(), OpCounter() as c:
        fn(*args, **kwargs)
    return c
