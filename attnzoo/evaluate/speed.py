"""Decode speed: greedy tokens/s with the model's KV cache, batch 1, after a warm-up."""
from __future__ import annotations

import time

import torch

from ..hf_compat import model_cache_kwarg, output_cache

__all__ = ["decode_tokens_per_second"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 64, warmup: int = 4) -> float:
    """Greedy-decode ``new_tokens`` after ``prompt`` (``[1, P]``), one token per forward with the
    cache (see :mod:`attnzoo.hf_compat`); models without a cache recompute the whole prefix. Returns the
    rate of the timed tokens (prefill and ``warmup`` tokens excluded)."""
    device = next(model.parameters()).device
    ids = prompt.to(device)
    kwarg = model_cache_kwarg(model)

    def run(n: int, ids: torch.Tensor) -> float:
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

    run(warmup, ids)
    return new_tokens / run(new_tokens, ids)
