"""What every group shares: the run's options, a case, and :func:`measure`, which times competing cases side by
side (forward, forward+backward) and returns their rows.

A group module builds :class:`Case` objects (a name and a ``make()`` that creates the inputs and returns the
forward callable) and hands them to :func:`measure`; the clocks, peak memory, CUDA-graph device time, TF/s,
error rows and the backend label are done here, once for all groups.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .record import Row
from .timing import gpu_ms, peak_mb, time_ms

__all__ = ["Options", "Case", "measure"]


@dataclass
class Options:
    """What ``run(options)`` of a group receives.

    ``smoke``: tiny shapes (seconds on a CPU; checks the harness, not the speed). ``sections``: the sections of
    the group to run (None: its default ones). ``cuda_graph``: also measure device time (CUDA graphs).
    ``profile``: also record each timed step under torch.profiler (:mod:`attnzoo.bench.profile`)."""
    smoke: bool = False
    sections: frozenset[str] | None = None
    cuda_graph: bool = True
    profile: bool = False
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    t0: float = field(default_factory=time.time)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def wants(self, section: str, default: bool = True) -> bool:
        """Whether to run ``section`` (``default``: whether it runs when no sections are named)."""
        return section in self.sections if self.sections is not None else default

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


@dataclass
class Case:
    """One competitor. ``make()`` builds its inputs and returns the forward callable (returning a tensor).

    ``flops``: forward FLOPs (TF/s is reported when given; fwd+bwd counts 3.5x). ``backend``: a label, or a
    callable asked right after the first call (e.g. which backend dispatch picked). ``grad_of``: fwd+bwd runs
    ``torch.autograd.grad(out, grad_of(), dO)`` with a fixed random ``dO`` instead of backpropagating
    ``out.float().sum()``. ``modes``: the modes this case takes part in (default: all of the call's)."""
    name: str
    make: Callable[[], Callable[[], torch.Tensor]]
    flops: float | None = None
    backend: str | Callable[[], str] = ""
    extra: dict = field(default_factory=dict)
    grad_of: Callable[[], tuple] | None = None
    modes: tuple[str, ...] | None = None


def _step(case: Case, mode: str):
    fwd = case.make()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fwd()
    elif case.grad_of is None:
        def step():
            fwd().float().sum().backward()
    else:
        inputs = case.grad_of()
        with torch.no_grad():
            dout = torch.randn_like(fwd())

        def step():
            torch.autograd.grad(fwd(), inputs, dout)
    return step


def _backend(case: Case) -> str:
    try:
        return case.backend() if callable(case.backend) else case.backend
    except Exception as e:  # noqa: BLE001 - a label must not fail the row
        return f"? ({type(e).__name__})"


def measure(options: Options, section: str, n: int, cases: list[Case], *, modes=("fwd", "fwd+bwd"),
            rounds: int = 1, rep_ms: float = 100) -> list[Row]:
    """Time ``cases`` side by side; one row per case and mode (NaN ``ms`` and ``error`` where one fails).

    Per mode: peak memory first, one case alive at a time (with the first call's time, compile included); then
    all cases built and timed round-robin ``rounds`` times in a rotated order, each keeping the median of its
    rounds (clocks and caches drift by several percent between measurements at sub-millisecond times, so
    competitors are measured side by side, and whoever follows a long, hot kernel changes every round); then the
    device time of each from a CUDA graph (``options.cuda_graph``, CUDA only); with ``options.profile``, the top
    entries of each step's profile in ``extra["profile"]``."""
    rows: list[Row] = []
    for mode in modes:
        active = [c for c in cases if c.modes is None or mode in c.modes]
        if not active:
            continue
        mems, first, backends, errors = {}, {}, {}, {}
        for c in active:  # memory and first call, one case alive at a time
            try:
                if options.cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                t = time.time()
                step = _step(c, mode)
                step()
                if options.cuda:
                    torch.cuda.synchronize()
                first[c.name] = round(time.time() - t, 2)
                backends[c.name] = _backend(c)
                mems[c.name] = peak_mb(step)
                del step
            except Exception as e:  # one case failing must not hide the others
                errors[c.name] = f"{type(e).__name__}: {str(e)[:300]}"
        steps = {}
        for c in active:
            if c.name in errors:
                continue
            try:
                steps[c.name] = _step(c, mode)
                steps[c.name]()
            except Exception as e:  # noqa: BLE001
                errors[c.name] = f"{type(e).__name__}: {str(e)[:300]}"
        names = list(steps)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                try:
                    times[name].append(time_ms(steps[name], rep_ms=rep_ms))
                except Exception as e:  # noqa: BLE001
                    errors.setdefault(name, f"{type(e).__name__}: {str(e)[:300]}")
        graph = {}
        if options.cuda and options.cuda_graph:
            for name in names:
                if name in errors:
                    continue
                try:
                    graph[name] = gpu_ms(steps[name])
                except Exception as e:  # noqa: BLE001 - e.g. a host sync inside: report the do_bench time only
                    options.log(f"  ({name} {mode}: no CUDA graph time: {type(e).__name__}: {str(e)[:120]})")
        profiles = {}
        if options.profile:
            from .profile import kernel_profile

            for name in names:
                if name in errors:
                    continue
                try:
                    profiles[name] = kernel_profile(steps[name], options.cuda)
                except Exception as e:  # noqa: BLE001 - the profile is an extra: the row keeps its times
                    options.log(f"  ({name} {mode}: no profile: {type(e).__name__}: {str(e)[:120]})")
        del steps
        for c in active:
            ts = times.get(c.name) or []
            row = Row(section, c.name, n, mode, float("nan"), backend=backends.get(c.name, ""),
                      extra={**c.extra})
            if c.name in errors or not ts:
                row.error = errors.get(c.name, "not timed")
            else:
                ms = statistics.median(ts)
                row.ms = round(ms, 4)
                if c.flops:
                    row.tflops = round(c.flops * (3.5 if mode == "fwd+bwd" else 1.0) / ms / 1e9, 1)
                if len(ts) > 1:
                    row.extra["spread_pct"] = round(100 * (max(ts) - min(ts)) / ms, 1)
                if c.name in graph:
                    row.gpu_ms = round(graph[c.name], 4)
                if mems.get(c.name) is not None:
                    row.peak_mb = round(mems[c.name], 1)
                if c.name in first:
                    row.extra["first_call_s"] = first[c.name]
                if profiles.get(c.name):
                    row.extra["profile"] = profiles[c.name]
            rows.append(row)
            options.log(f"{section} {row.name} n={n} {mode}: ms={row.ms} gpu_ms={row.gpu_ms} tflops={row.tflops} "
                        f"peak_mb={row.peak_mb} {row.backend}" + (f" ERROR {row.error}" if row.error else ""))
    return rows
