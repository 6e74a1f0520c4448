"""Decode speed: greedy tokens/s with the model's KV cache, batch 1: the median of several timed
runs after a warm-up, with their spread and the thread count (wall clock, so it depends on the
machine and its load; the spread says how much)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..hf_compat import model_cache_kwarg, output_cache

__all__ = ["DecodeSpeed", "decode_speed", "decode_tokens_per_second"]


@dataclass(frozen=True)
class DecodeSpeed:
    """``median`` tokens/s over ``repeats`` timed runs of ``new_tokens`` each; ``low``/``high``: the
    slowest and fastest run; ``threads``: torch's intra-op threads during the runs."""

    median: float
    low: float
    high: float
    repeats: int
    new_tokens: int
    threads: int

    @property
    def spread(self) -> float:
        """``high / low`` (1.0: every run alike)."""
        return self.high / self.low if self.low else float("inf")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int = 64, warmup: int = 4, repeats: int = 5
                 ) -> DecodeSpeed:
    """Greedy-decode ``new_tokens`` after ``prompt`` (``[1, P]``), one token per forward with the
    cache (see :mod:`attnzoo.hf_compat`); models without a cache recompute the whole prefix. Each of
    ``repeats`` runs starts from the same prompt (prefill not timed); one run of ``warmup`` tokens
    goes first. Returns the median rate and the spread of the runs."""
    device = next(model.parameters()).device
    ids = prompt.to(device)
    kwarg = model_cache_kwarg(model)

    def run(n: int) -> float:
        out = model(input_ids=ids, use_cache=True)
        past, seq = output_cache(out), ids
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            if past is not None:
                out = model(input_ids=nxt, use_cache=True, **{kwarg: past})
                past = output_cache(out)
            else:
                seq = torch.cat([seq, nxt], dim=1)
                out = model(input_ids=seq)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    if warmup:
        run(warmup)
    rates = [new_tokens / run(new_tokens) for _ in range(max(1, repeats))]
    return DecodeSpeed(statistics.median(rates), min(rates), max(rates), len(rates), new_tokens,
                       torch.get_num_threads())


def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 64, warmup: int = 4,
                             repeats: int = 5) -> float:
    """The median of :func:`decode_speed`."""
    return decode_speed(model, prompt, new_tokens, warmup, repeats).median
