"""``attnzoo uptrain --context-parallel N``: train on sequences sharded across N processes.

The processes of a launch (``accelerate launch --num_processes W``) form ``W / N`` data-parallel groups of ``N``
consecutive ranks. The ``N`` ranks of a group read the same sequences and each keeps its shard of the positions
(:class:`~attnzoo.ops.context_parallel.Sharding`: zig-zag, which balances causal work; contiguous for models whose
every layer is a sliding window, so that the halo exchange serves them). Everything but attention is per position
and runs on the shard as it is; the model gets the shard's global ``position_ids`` (RoPE) and its attention runs
through a ``transformers`` attention implementation that calls
:func:`~attnzoo.ops.context_parallel.context_parallel_attention` (sliding-window layers:
:func:`~attnzoo.ops.context_parallel.context_parallel_sparse_attention`) over the group.

The loss: each rank sums the cross-entropy of its positions (the targets are the next tokens of the whole
sequence, so a shard's last position is no special case) and divides by the whole batch's predicted tokens times
``1 / N``; data parallelism (DDP) averages gradients over all ``W`` ranks, so the update and the logged loss equal
those of one process training the whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.context_parallel import Sharding, context_parallel_attention, context_parallel_sparse_attention
from ..ops.sparse import SlidingWindow

__all__ = ["ContextParallelTraining", "KERNEL_NAME", "use_context_parallel_kernel", "sequence_layout", "shard_inputs"]

KERNEL_NAME = "attnzoo_context_parallel"


@dataclass(frozen=True)
class _Call:
    """What one forward's attention layers need, passed as a model keyword (``attnzoo_cp``) down to them."""

    sharding: Sharding
    group: object


def _cp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, attnzoo_cp=None, **kwargs):
    """``transformers`` attention-interface function over a context-parallel group (training forwards only)."""
    if attnzoo_cp is None:
        raise ValueError(
            f"the {KERNEL_NAME!r} attention implementation runs inside `attnzoo uptrain "
            "--context-parallel` only (it needs the sequence's sharding)"
        )
    if attention_mask is not None:
        raise ValueError(
            "--context-parallel: the model received an attention mask (padding or a custom mask); "
            "context-parallel training takes unpadded sequences only"
        )
    if dropout:
        raise ValueError(
            f"--context-parallel: attention dropout ({dropout}) is not supported; set the model's "
            "attention_dropout to 0"
        )
    from ..patches.hf import PATTERN_ATTR
    from ..patches.hf.kernel import window_of_hf

    causal = bool(getattr(module, "is_causal", True))
    pattern = getattr(module, PATTERN_ATTR, None)
    if pattern is None and kwargs.get("sliding_window"):
        pattern = SlidingWindow(window=window_of_hf(kwargs["sliding_window"]), causal=causal)
    s, group = attnzoo_cp.sharding, attnzoo_cp.group
    if pattern is None:
        out = context_parallel_attention(query, key, value, s, causal=causal, scale=scaling, group=group)
    else:
        method = "halo" if s.layout == "contiguous" else "ring"
        out = context_parallel_sparse_attention(
            query, key, value, pattern, s, scale=scaling, group=group, method=method
        )
    return out.transpose(1, 2).contiguous(), None


def _all_sliding(config) -> bool:
    cfg = config.get_text_config()
    if not getattr(cfg, "sliding_window", None):
        return False
    types = getattr(cfg, "layer_types", None)
    return types is None or all(t == "sliding_attention" for t in types)


def _check_model(model) -> None:
    """Attention that does not go through ``transformers``' interface would run on the shard alone: refuse it."""
    from ..patches.hf import PATTERN_ATTR

    for name, mod in model.named_modules():
        pattern = getattr(mod, PATTERN_ATTR, None)
        if pattern is not None and type(pattern) is not SlidingWindow:
            raise ValueError(
                f"--context-parallel: module {name!r} attends with the pattern {pattern.describe()}, "
                "whose global tokens reach every shard; context parallelism serves dense and "
                "sliding-window attention"
            )
        if type(mod).__module__.startswith("attnzoo."):
            raise ValueError(
                f"--context-parallel: module {name!r} ({type(mod).__name__}) computes attention "
                "itself, not through transformers' attention interface, so it cannot see the other "
                "shards; context parallelism serves models whose layers keep their transformers "
                "attention modules (native architectures, KV-head conversions, sliding windows)"
            )


def use_context_parallel_kernel(model) -> None:
    """Check that every attention layer of ``model`` goes through ``transformers``' attention interface and make
    them run context-parallel (the forward then needs :func:`shard_inputs`' keywords)."""
    _check_model(model)
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL_NAME, _cp_attention)
    model.set_attn_implementation(KERNEL_NAME)


def sequence_layout(config) -> str:
    """The sharding layout for a model: contiguous when every layer is a sliding window (halo exchange), else
    zig-zag (balanced causal work; sliding layers then take the ring)."""
    return "contiguous" if _all_sliding(config) else "zigzag"


def shard_inputs(ids: torch.Tensor, sharding: Sharding, rank: int, group) -> dict:
    """The model's keyword arguments for rank ``rank``'s shard of the whole sequences ``ids [batch, seq]``."""
    pos = sharding.positions(rank, ids.device)
    return {
        "input_ids": ids[:, pos],
        "position_ids": pos[None].expand(ids.shape[0], -1),
        "use_cache": False,
        "attnzoo_cp": _Call(sharding, group),
    }


class ContextParallelTraining:
    """The context-parallel side of one training run: groups, sharding of a batch, the model's kernel, the loss."""

    def __init__(self, size: int, accelerator, model):
        import torch.distributed as dist

        world = accelerator.num_processes
        if world % size:
            raise ValueError(
                f"--context-parallel={size}: the launch has {world} process(es); expected a divisor "
                f"of {world} (processes = context-parallel size x data-parallel size): launch "
                f"`accelerate launch --num_processes {size} -m attnzoo uptrain ...` (or a multiple)"
            )
        if not dist.is_initialized():
            raise ValueError(
                f"--context-parallel={size}: torch.distributed is not initialised; launch with "
                f"`accelerate launch --num_processes {size} -m attnzoo uptrain ...` (or torchrun)"
            )
        rank = accelerator.process_index
        self.size, self.data_world, self.data_rank = size, world // size, rank // size
        self.group = None
        for g in range(self.data_world):  # every process creates every group (torch.distributed's rule)
            ranks = list(range(g * size, (g + 1) * size))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.group = group
        self.cp_rank = rank % size
        self.layout = sequence_layout(model.config)
        use_context_parallel_kernel(model)

    def inputs(self, ids: torch.Tensor) -> dict:
        """The model's keyword arguments for this rank's shard of the whole sequences ``ids [batch, seq]``."""
        return shard_inputs(ids, Sharding(ids.shape[1], self.size, self.layout), self.cp_rank, self.group)

    def loss(self, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(loss, parts)`` as :func:`~attnzoo.uptrain.losses.mixed_loss` gives them, for this rank's positions:
        ``size`` x (cross-entropy summed over its positions) / (the batch's predicted tokens)."""
        n = ids.shape[1]
        pos = Sharding(n, self.size, self.layout).positions(self.cp_rank, ids.device)
        has_next = pos < n - 1
        targets = ids[:, (pos + 1).clamp(max=n - 1)]
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [batch, local]
        loss = (ce * has_next).sum() * self.size / (ids.shape[0] * (n - 1))
        return loss, {"ce": loss.detach()}
