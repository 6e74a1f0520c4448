"""Attention transfer (Hedgehog, ICLR'24; LoLCATs, ICLR'25): the ``transfer`` stage of ``attnzoo uptrain``.

After ``attnzoo convert --to linear`` (or ``performer``, ``linformer``) the feature maps (and Linformer's
projections) are untrained. This stage trains only them: every converted layer computes, on the same input,
its linear heads and the softmax heads it stands for (the teacher: the frozen q/k/v projections with exact
softmax attention), adds the MSE between the two per head, and passes the *teacher's* output on, so that every
layer sees the input the original model would give it (teacher-forced, layer by layer; all layers train at
once, each against its own teacher). The loss is the mean of the layers' MSEs. Everything else is frozen.
Then the usual stage (LoRA, distillation) recovers the rest: ``attnzoo uptrain --lora-rank 8 ...``.

:func:`start_transfer` prepares a model, :func:`transfer_objective` is the loss of one forward,
:func:`stop_transfer` turns the layers back to their linear outputs.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["start_transfer", "transfer_objective", "stop_transfer", "transfer_modules", "TRANSFER_PARAMS"]

TRANSFER_PARAMS = ("q_feature_map", "k_feature_map", "k_seq_proj", "v_seq_proj")  # what the stage trains


def transfer_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` that can learn by attention transfer (the linear family's)."""
    return [m for m in model.modules() if hasattr(m, "softmax_heads") and hasattr(m, "attend_heads")]


def start_transfer(model: nn.Module) -> int:
    """Freeze everything but the feature maps (and Linformer's projections) and make the linear layers
    teacher-forced; returns the number of parameters left to train. Raises when the model has no layer to
    transfer to or nothing to train (``performer``'s features are random: use ``linear --feature-map
    performer`` for learned ones)."""
    mods = transfer_modules(model)
    if not mods:
        raise ValueError("--stage transfer trains the feature maps of linear-attention layers, and this model has "
                         "none: convert it first (attnzoo convert --to linear ...)")
    model.requires_grad_(False)
    trained = 0
    for m in mods:
        m.transfer = True
        for name, p in m.named_parameters():
            if name.split(".")[0] in TRANSFER_PARAMS:
                p.requires_grad_(True)
                trained += p.numel()
    if not trained:
        raise ValueError("--stage transfer: the linear-attention layers have no learnable feature map (performer's "
                         "features are random); convert with --to linear --feature-map performer to learn them")
    return trained


def stop_transfer(model: nn.Module) -> None:
    for m in transfer_modules(model):
        m.transfer, m.transfer_loss = False, None


def transfer_objective(model: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The stage's loss after a forward: the mean over layers of each layer's per-head MSE against its softmax
    teacher; ``parts["ce"]`` is the cross-entropy of the teacher-forced logits (the original model's)."""
    losses = [m.transfer_loss for m in transfer_modules(model) if getattr(m, "transfer_loss", None) is not None]
    if not losses:
        raise ValueError("--stage transfer: no layer computed a transfer loss (start_transfer was not called?)")
    loss = torch.stack(losses).mean()
    with torch.no_grad():
        ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss, {"ce": ce}
