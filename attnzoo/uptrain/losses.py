"""Losses of an uptraining step: next-token cross-entropy and logit distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["next_token_ce", "distill_kl", "mixed_loss"]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]`` (float32 math)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || student)`` per predicted token at ``temperature``, times ``T**2`` (Hinton et al.),
    averaged over the positions that predict a next token."""
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="none").sum(-1).mean() * (t * t)


def mixed_loss(student_logits, ids, teacher_logits=None, alpha: float = 0.5, temperature: float = 1.0):
    """``(loss, parts)``: cross-entropy alone, or ``alpha * KL + (1 - alpha) * CE`` with a teacher."""
    ce = next_token_ce(student_logits, ids)
    if teacher_logits is None:
        return ce, {"ce": ce.detach()}
    kl = distill_kl(student_logits, teacher_logits, temperature)
    return alpha * kl + (1 - alpha) * ce, {"ce": ce.detach(), "kl": kl.detach()}
