"""Timing helpers shared by the sparse experiment scripts in this folder (they import it as ``timing``: a script's
own folder is first on ``sys.path``). Not library code.

* :func:`graph_us`: device time of ``fn`` replayed from a CUDA graph (``do_bench_cudagraph`` median), µs.
* :func:`kernel_us`: device time per call of each kernel ``fn`` launches (torch.profiler), µs, largest first.
* :func:`host_us`: host time per call with the GPU kept busy by a sleep kernel, so the host never waits, µs.
* :class:`Log`: prints a line and appends it to a file.
"""
import time

import torch
import triton.testing as tt


def graph_us(fn, rep: int = 60) -> float:
    fn()
    torch.cuda.synchronize()
    return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def kernel_us(fn, iters: int = 20, name=lambda kernel: kernel) -> dict:
    """{kernel: µs per call}; ``name`` maps a kernel's name to the key it is summed under (e.g. its first 60
    characters)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    tot: dict = {}
    for ev in pr.events():
        if ev.device_type.name == "CUDA":
            tot[name(ev.name)] = tot.get(name(ev.name), 0.0) + ev.device_time / iters
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def host_us(fn, calls: int, warmup: int = 0) -> float:
    """Host µs per call of ``fn`` after ``warmup`` calls, while a ~1 s sleep kernel keeps the GPU's queue full."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


class Log:
    """``log(*parts)``: print the parts joined by spaces and append them as a line to ``path``."""

    def __init__(self, path: str, mode: str = "a"):
        self.file = open(path, mode)

    def __call__(self, *parts) -> None:
        s = " ".join(str(x) for x in parts)
        print(s, flush=True)
        self.file.write(s + "\n")
        self.file.flush()
