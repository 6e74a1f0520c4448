"""Clocks of the benchmark harness: host-inclusive time, device time, peak memory, FLOP counts."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["time_ms", "gpu_ms", "peak_mb", "flops_attention"]


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs; the
    host's launch time counts where the GPU waits for it) on the GPU, a perf_counter loop on the CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def gpu_ms(fn: Callable[[], object], *, rep_ms: float = 100) -> float:
    """Device time: median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``), no host
    launch cost between kernels: what the step costs when a larger model keeps the GPU busy. CUDA only; raises
    where ``fn`` cannot be captured (a host sync inside, ...)."""
    import gc

    import triton.testing

    # Python's cyclic collector running inside the capture can free a compiled kernel of an earlier case (its
    # module unload is not allowed while a stream captures: the capture is invalidated): collect first, not during
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    finally:
        if enabled:
            gc.enable()


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak device memory (MiB) allocated while ``fn()`` runs, inputs included; None on CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def flops_attention(batch: int, q_heads: int, q_len: int, k_len: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of one attention forward (QKᵀ and PV); causal counts half."""
    f = 4.0 * batch * q_heads * q_len * k_len * head_dim
    return f / 2 if causal else f
