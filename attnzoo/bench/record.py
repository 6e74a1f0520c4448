"""One benchmark row, the run's environment, and the result files of a group (JSON + markdown).

A group's results are one ``<group>-<tag>.json`` (environment, rows, peers' rows) and one ``<group>-<tag>.md``
(the same as tables, plus the group's summary), ``tag`` naming the device (``h200``, ``h100``, ``cpu``).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields

import torch

from ..table import format_table, markdown_table
from .profile import profile_lines

__all__ = ["Row", "environment", "device_tag", "write_group", "read_group", "render_markdown", "print_rows",
           "COLUMNS"]


@dataclass
class Row:
    """One measured case. ``group`` is the section within a harness group (``dense-op``, ``sliding``, ...;
    ``peer:<group>`` for the peers' rows). ``ms``: median of ``triton.testing.do_bench`` (host launch time
    included, as the peers are timed); ``gpu_ms``: median of the same step replayed from a CUDA graph (device
    time only). ``extra`` holds what a group adds (kept fraction, tiles, ratios, ...)."""
    group: str
    name: str
    n: int
    mode: str  # "fwd", "fwd+bwd"
    ms: float
    tflops: float | None = None
    peak_mb: float | None = None
    backend: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)
    gpu_ms: float | None = None
    gbps: float | None = None
    error: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        known.setdefault("ms", float("nan"))
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @property
    def ok(self) -> bool:
        return isinstance(self.ms, (int, float)) and not math.isnan(self.ms)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _commit() -> str:
    commit = os.environ.get("ATTNZOO_COMMIT", "")  # a copied tree without .git: the caller says
    if commit:
        return commit
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=10).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=here, timeout=10).stdout.strip()
            commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def environment() -> dict:
    """Device, library versions, commit and date of this run."""
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu"),
           "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    for pkg in ("triton", "transformers", "flash-attn-4"):
        env[pkg] = _version(pkg)
    return env


def device_tag(name: str | None = None) -> str:
    """A short file-name tag for the device: ``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``;
    ``cpu`` without CUDA."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name()
    words = re.sub(r"^nvidia\s+", "", name.lower()).replace("geforce ", "").split()
    for w in words:  # the first word with a digit: the model (h200, a100-sxm4-80gb -> a100, 4090)
        if any(c.isdigit() for c in w):
            return re.sub(r"[^a-z0-9]+.*$", "", w) or w
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


#: The columns every table shows (those no row fills are dropped); a group adds its own after ``backend``.
COLUMNS = ["name", "n", "mode", "ms", "gpu_ms", "tflops", "gbps", "peak_mb", "backend"]
TAIL = ["note", "error"]

HOW = ("`ms`: median of `triton.testing.do_bench` (host launch time included, as the peers are timed); "
       "`gpu_ms`: median of `triton.testing.do_bench_cudagraph`, the same step replayed from a CUDA graph (device "
       "time only; `ms` well above `gpu_ms` means the host, not the GPU, sets the pace). TF/s counts the attention "
       "matmul FLOPs from `ms` (fwd+bwd = 3.5 x fwd); `peak_mb`: peak memory allocated during one call, inputs "
       "included. fwd+bwd backpropagates `out.float().sum()`, except rows named \"dO given\" "
       "(`torch.autograd.grad(out, inputs, dO)`: the attention's own kernels).")


def _display(rows: list[Row]) -> list[dict]:
    """Rows as dicts for a table: long notes and errors cut to one line (the JSON keeps them whole)."""
    out = []
    for r in rows:
        d = r.as_dict()
        for k in TAIL:
            if d.get(k) and len(d[k]) > 100:
                d[k] = d[k][:97] + "..."
        out.append(d)
    return out


def _columns(rows: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    cols = [c for c in [*COLUMNS, *extra, *TAIL] if any(r.get(c) not in (None, "") for r in rows)]
    return cols or ["name"]


def render_markdown(group: str, env: dict, rows: list[Row], peers: list[Row], *, summary: list[str] = (),
                    extra_columns: tuple[str, ...] = (), title: str = "") -> str:
    """The markdown of one group's results: header (device, commit, date), one table per section, the group's
    summary, where the time goes (rows measured with ``--profile``), the peers' table."""
    lines = [f"# attnzoo bench: {group}" + (f" ({env.get('device')})" if env.get("device") else ""), ""]
    if title:
        lines += [title, ""]
    lines += [", ".join(f"{k}: {v}" for k, v in env.items() if v not in (None, "")), "", HOW, ""]
    sections: dict[str, list[Row]] = {}
    for r in rows:
        sections.setdefault(r.group, []).append(r)
    for name, section in sections.items():
        rs = _display(section)
        lines += [f"## {name}", "", markdown_table(rs, _columns(rs, extra_columns)), ""]
    if summary:
        lines += list(summary) + [""]
    lines += profile_lines(rows)
    if peers:
        ps = _display(peers)
        lines += ["## peers (peers_bench.py, same run)", "",
                  markdown_table(ps, ["group"] + _columns(ps)), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_group(out_dir: str, stem: str, group: str, env: dict, rows: list[Row], peers: list[Row], *,
                summary: list[str] = (), extra_columns: tuple[str, ...] = (), title: str = "",
                options: dict | None = None) -> tuple[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")
    data = {"group": group, "environment": env, "options": options or {},
            "rows": [r.as_dict() for r in rows], "peers": [r.as_dict() for r in peers]}
    with open(jpath, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(render_markdown(group, env, rows, peers, summary=summary, extra_columns=extra_columns, title=title))
    return jpath, mpath


def read_group(path: str) -> tuple[str, dict, list[Row], list[Row], dict]:
    """(group, environment, rows, peers, options) of a ``<group>-<tag>.json`` written by :func:`write_group`."""
    with open(path) as f:
        data = json.load(f)
    for key in ("group", "environment", "rows"):
        if key not in data:
            raise ValueError(f"{path}: not an attnzoo bench result (no {key!r}; expected the JSON that "
                             "`attnzoo bench` writes)")
    return (data["group"], data["environment"], [Row.from_dict(r) for r in data["rows"]],
            [Row.from_dict(r) for r in data.get("peers", [])], data.get("options", {}))


def print_rows(rows: list[Row], title: str = "") -> None:
    ds = _display(rows)
    print(format_table(ds, ["group"] + _columns(ds), title=title))
