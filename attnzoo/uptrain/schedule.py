"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine"]


class _WarmupCosine:
    """Picklable/serialisable multiplier for ``LambdaLR`` (no closure state beyond three numbers)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, total_steps: int, warmup_fraction: float, min_ratio: float):
    warmup = int(round(total_steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(total_steps, warmup, min_ratio))
