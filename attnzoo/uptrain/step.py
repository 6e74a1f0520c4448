"""The module accelerate wraps for training: the student (and a sharded teacher), whose forward returns the loss.

Putting the loss inside one ``nn.Module`` lets DDP and FSDP see a single forward: the student's final
hidden states go straight into :func:`~attnzoo.uptrain.losses.chunked_head_loss` (logits a chunk of
positions at a time, never ``[batch, seq, vocab]`` in float32), and under FSDP the output head's
gathered weight is used inside the same forward that gathered it.

The teacher is either *replicated* (each process holds a full frozen copy, not registered as a submodule,
so DDP/FSDP never see it; bf16 weights under bf16 mixed precision) or *sharded* (a registered submodule, so
FSDP shards its layers like the student's; float32 weights, cast by FSDP's mixed-precision policy).

Models whose logits are not a plain ``lm_head(hidden)`` (logit soft-capping or scaling in the forward, an
adapter on the head) and ``loss_chunk=0`` use the plain loss on full logits (:func:`mixed_loss`).
"""
from __future__ import annotations

import torch
from torch import nn

from .losses import _chunk_grads, chunked_head_loss, mixed_loss
from .transfer import transfer_objective

__all__ = ["TrainModule", "decoder_layer_names", "plain_head"]

# config fields that change logits after lm_head in some architectures (None or 1 means no change)
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layer_names(model: nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (transformers' ``_no_split_modules``)."""
    return set(getattr(_base(model), "_no_split_modules", None) or ())


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head when the logits are exactly ``head(final hidden states)``; else None."""
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    cfg = base.config.get_text_config()
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _HEAD_EXTRAS):
        return None
    return head


def _decoder(model: nn.Module) -> nn.Module | None:
    base = _base(model)
    try:
        dec = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return dec if dec is not base else None


class TrainModule(nn.Module):
    """``forward(ids) -> (loss, {"ce": ..., "kl": ...})`` for one micro-batch.

    ``teacher_sharded``: the teacher is a submodule (FSDP shards it); else it is held outside the module
    (replicated). ``loss_chunk``: positions per chunk of the output-head loss, 0 = plain full logits.
    ``compile``: ``torch.compile`` the chunk maths (the blocks are compiled by :meth:`compile_blocks`).
    ``context_parallel``: a :class:`~attnzoo.uptrain.context_parallel.ContextParallelTraining`, whose sharded
    inputs and loss replace the rest (cross-entropy only). ``transfer``: the attention-transfer stage
    (:func:`~attnzoo.uptrain.transfer.transfer_objective` on full logits: the layers' MSE against their softmax
    heads).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, teacher_sharded: bool = False,
                 alpha: float = 0.5, temperature: float = 1.0, loss_chunk: int = 512, compile: bool = False,
                 context_parallel=None, transfer: bool = False):
        super().__init__()
        self.transfer = transfer
        object.__setattr__(self, "_cp", context_parallel)  # a ContextParallelTraining: its own inputs and loss
        self.student = student
        if teacher_sharded and teacher is not None:
            self.teacher = teacher
        else:
            self.teacher = None
            object.__setattr__(self, "_replicated_teacher", teacher)  # not a submodule: DDP/FSDP leave it alone
        self._no_split_modules = decoder_layer_names(student)  # FSDP's auto-wrap reads this
        self.alpha, self.temperature, self.loss_chunk = alpha, temperature, loss_chunk
        self._chunked = bool(loss_chunk) and plain_head(student) is not None and _decoder(student) is not None
        if teacher is not None:
            self._chunked = self._chunked and plain_head(teacher) is not None and _decoder(teacher) is not None
        self._chunked = self._chunked and context_parallel is None and not transfer
        self._step_fn = torch.compile(_chunk_grads, dynamic=False) if compile else _chunk_grads

    @property
    def chunked(self) -> bool:
        """Whether the chunked output-head loss is used (else full logits)."""
        return self._chunked

    def get_teacher(self) -> nn.Module | None:
        return self.teacher if self.teacher is not None else self.__dict__.get("_replicated_teacher")

    def compile_blocks(self) -> int:
        """``torch.compile`` the ``forward`` of every repeated block of the student and teacher (regional
        compilation: one graph per block type, reused by every layer; the hooks DDP/FSDP put around a
        block stay outside the compiled code, so call it after ``accelerator.prepare``); returns how many."""
        n = 0
        for model in (self.student, self.get_teacher()):
            if model is None:
                continue
            names = decoder_layer_names(model)
            for m in model.modules():
                if type(m).__name__ in names:
                    m.forward = torch.compile(m.forward)
                    n += 1
        return n

    def forward(self, ids: torch.Tensor):
        if self._cp is not None:  # this rank's shard of the sequences, full logits of the shard (no teacher)
            return self._cp.loss(self.student(**self._cp.inputs(ids)).logits, ids)
        if self.transfer:  # only the feature maps train; the logits give the teacher-forced CE for the log
            return transfer_objective(self.student, self.student(input_ids=ids, use_cache=False).logits, ids)
        teacher = self.get_teacher()
        if not self._chunked:
            logits = self.student(input_ids=ids, use_cache=False).logits
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
            return mixed_loss(logits, ids, t_logits, self.alpha, self.temperature)
        hidden = _decoder(self.student)(input_ids=ids, use_cache=False).last_hidden_state
        t_hidden = t_head = None
        if teacher is not None:
            with torch.no_grad():
                t_hidden = _decoder(teacher)(input_ids=ids, use_cache=False).last_hidden_state
            t_head = plain_head(teacher)
        return chunked_head_loss(hidden, plain_head(self.student), ids, t_hidden, t_head, self.alpha,
                                 self.temperature, self.loss_chunk, self._step_fn)
