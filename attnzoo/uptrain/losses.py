"""Losses of an uptraining step: next-token cross-entropy and logit distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["next_token_ce", "distill_kl", "mixed_loss", "chunked_head_loss"]


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


def _chunk_grads(h, w, b, tgt, th, tw, tb, alpha: float, temperature: float, scale: float):
    """One chunk of rows: ``(loss_sum, ce_sum, kl_sum, d_logits)`` with ``d_logits`` the gradient of
    ``scale * (alpha * KL + (1 - alpha) * CE)`` (CE alone without a teacher) w.r.t. the student's logits.

    The logits are computed in the ambient precision (bf16 under autocast) and upcast to float32 for the
    softmax; only ``[rows, vocab]`` tensors exist, and (in eager mode) few of them at a time. softmax - onehot
    is one elementwise expression: written as an in-place or scatter update it was miscompiled by inductor."""
    z = F.linear(h, w, b).float()
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(1, tgt[:, None]).squeeze(1)).sum()
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == tgt[:, None]
    if th is None:
        d = torch.exp(z - lse[:, None]) - onehot.to(z.dtype)
        return ce, ce, torch.zeros_like(ce), d * scale
    t = temperature
    ls = z - lse[:, None] if t == 1.0 else torch.log_softmax(z / t, dim=-1)
    d = (1.0 - alpha) * (torch.exp(z - lse[:, None]) - onehot.to(z.dtype))
    del z, onehot
    lt = torch.log_softmax(F.linear(th, tw, tb).float() / t, dim=-1)
    pt = lt.exp()
    kl = (pt * (lt - ls)).sum() * (t * t)
    del lt
    d = d + (alpha * t) * (ls.exp() - pt)
    return alpha * kl + (1.0 - alpha) * ce, ce, kl, d * scale


class _ChunkedHeadLoss(torch.autograd.Function):
    """``mean over rows of [alpha * KL + (1 - alpha) * CE]`` of ``hidden @ weight.T`` (+ bias), chunk by chunk.

    The gradients w.r.t. ``hidden``, ``weight`` and ``bias`` are computed in the forward pass, chunk by
    chunk, so neither pass ever holds more than ``chunk`` rows of logits (the approach of fused linear
    cross-entropy kernels); the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_hidden, t_weight, t_bias, alpha, temperature, chunk, step_fn):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            th = t_hidden[s:e] if t_hidden is not None else None
            loss_c, ce_c, kl_c, d = step_fn(h, weight, bias, targets[s:e], th, t_weight, t_bias, alpha, temperature,
                                            1.0 / n)
            sums += torch.stack([loss_c, ce_c, kl_c])
            dc = d.to(h.dtype)  # matmuls in the ambient precision (autocast applies), accumulation in float32
            if need_h:
                grad_h[s:e] = dc @ weight.to(h.dtype)
            if need_w:
                grad_w += (dc.t() @ h).float()
            if need_b:
                grad_b += d.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        out = sums / n
        ce, kl = out[1].clone(), out[2].clone()
        ctx.mark_non_differentiable(ce, kl)
        return out[0].clone(), ce, kl

    @staticmethod
    def backward(ctx, g, _g_ce, _g_kl):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if need else None for need in ctx.which]
        grads = [None if x is None else (x * g).to(dt) for x, dt in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Linear, ids: torch.Tensor, teacher_hidden=None,
                      teacher_head: torch.nn.Linear | None = None, alpha: float = 0.5, temperature: float = 1.0,
                      chunk: int = 512, step_fn=None):
    """:func:`mixed_loss` computed from the final hidden states ``[batch, seq, hidden]`` and the output
    head, ``chunk`` positions at a time: same values and gradients, without materialising the
    ``[batch, seq, vocab]`` float32 logits (of the student or of the teacher). Returns ``(loss, parts)``."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    tgt = ids[:, 1:].reshape(-1)
    th = tw = tb = None
    if teacher_hidden is not None:
        th = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
        tw, tb = teacher_head.weight, teacher_head.bias
    loss, ce, kl = _ChunkedHeadLoss.apply(h, head.weight, head.bias, tgt, th, tw, tb, float(alpha),
                                          float(temperature), int(chunk), step_fn or _chunk_grads)
    parts = {"ce": ce} if teacher_hidden is None else {"ce": ce, "kl": kl}
    return loss, parts
