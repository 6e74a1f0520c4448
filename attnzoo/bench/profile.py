"""``attnzoo bench --profile``: where a case's time goes, kernel by kernel.

Each timed step is run a few more times under :mod:`torch.profiler`; its row gets ``extra["profile"]``, the
largest entries by self time per step (CUDA kernels and copies on a GPU; operators on the CPU), each with its
share of the step's total, and one entry for the rest. The group's markdown lists them under "where the time
goes". Device time only on a GPU: host gaps between launches show as ``ms`` above the kernels' sum (and above
``gpu_ms``), not here.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["kernel_profile", "profile_lines", "TOP"]

#: entries kept per row (the rest is summed into one "other" entry)
TOP = 8
_STEPS = 3


def _short(name: str, width: int = 100) -> str:
    """A kernel's name without its trailing argument list (C++ kernels; template arguments stay: they say which
    GEMM tile or elementwise functor), cut to ``width``."""
    name = name.strip()
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i].rstrip() or name
                break
    return name if len(name) <= width else name[: width - 3] + "..."


def _self_time_us(event, cuda: bool) -> float:
    if cuda:
        t = getattr(event, "self_device_time_total", None)
        return float(t if t is not None else getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def _calls(count: float, steps: int) -> float | int:
    per = count / steps
    return int(per) if per == int(per) else round(per, 2)


def kernel_profile(step: Callable[[], object], cuda: bool, *, steps: int = _STEPS, top: int = TOP) -> list[dict]:
    """``[{"name", "ms", "share", "calls"}]`` per step of ``step()``: the ``top`` largest self times (CUDA kernels
    and memory operations when ``cuda``, else CPU operators), then ``"other"`` (the rest) when anything is left;
    ``share`` in percent of the sum of all entries."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    want = "CUDA" if cuda else "CPU"
    entries: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if getattr(e.device_type, "name", str(e.device_type)).upper() != want:
            continue
        if not cuda and (not e.key.startswith("aten::") or e.key in ("aten::empty", "aten::empty_strided")):
            continue  # CPU: operators (autograd's and the profiler's own wrappers have no work of their own)
        us = _self_time_us(e, cuda)
        if us <= 0:
            continue
        slot = entries.setdefault(_short(e.key), [0.0, 0])
        slot[0] += us
        slot[1] += e.count
    total = sum(us for us, _ in entries.values())
    if total <= 0:
        return []
    ranked = sorted(entries.items(), key=lambda kv: -kv[1][0])
    out = [{"name": name, "ms": round(us / steps / 1e3, 4), "share": round(100 * us / total, 1),
            "calls": _calls(calls, steps)} for name, (us, calls) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        us = sum(v[0] for _, v in rest)
        out.append({"name": f"other ({len(rest)} kinds)", "ms": round(us / steps / 1e3, 4),
                    "share": round(100 * us / total, 1), "calls": _calls(sum(v[1] for _, v in rest), steps)})
    return out


def profile_lines(rows) -> list[str]:
    """Markdown: per row with a profile, its entries as a table (the section "where the time goes")."""
    from ..table import markdown_table

    profiled = [r for r in rows if r.extra.get("profile")]
    if not profiled:
        return []
    lines = ["## where the time goes (`--profile`: self time per step under torch.profiler)", ""]
    for r in profiled:
        entries = r.extra["profile"]
        total = sum(e["ms"] for e in entries)
        lines += [f"### {r.group}: {r.name}, n={r.n}, {r.mode} (profiled {total:.3f} ms a step; ms {r.ms}"
                  + (f", gpu_ms {r.gpu_ms}" if r.gpu_ms else "") + ")", "",
                  markdown_table(entries, ["name", "ms", "share", "calls"]), ""]
    return lines
