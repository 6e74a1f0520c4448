"""One benchmark row, and writing the results (JSON lines + markdown)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field

import torch

from ..table import format_table, markdown_table

__all__ = ["Row", "environment", "write_results"]


@dataclass
class Row:
    group: str
    name: str
    n: int
    mode: str  # "fwd" or "fwd+bwd"
    ms: float
    tflops: float | None = None
    peak_mb: float | None = None
    backend: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    commit = os.environ.get("ATTNZOO_COMMIT", commit)  # a copied tree without .git: the caller says
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": dev, "torch": torch.__version__, "commit": commit or "unknown",
            "date": datetime.date.today().isoformat(), "cuda": torch.version.cuda}


COLUMNS = ["group", "name", "n", "mode", "ms", "tflops", "peak_mb", "backend", "note"]


def write_results(rows: list[Row], out_dir: str, stem: str = "bench") -> tuple[str, str]:
    """Write ``<stem>.jsonl`` and ``<stem>.md`` (with the environment header) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    jpath, mpath = os.path.join(out_dir, f"{stem}.jsonl"), os.path.join(out_dir, f"{stem}.md")
    with open(jpath, "w") as f:
        f.write(json.dumps({"environment": env}) + "\n")
        for r in rows:
            f.write(json.dumps(r.as_dict()) + "\n")
    with open(mpath, "w") as f:
        f.write(f"# attnzoo bench: {stem}\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
        f.write("Times are medians of `triton.testing.do_bench` (ms); TF/s counts attention matmul FLOPs "
                "(fwd+bwd = 3.5 × fwd); peak_mb is the peak allocated during one call, inputs included.\n\n")
        f.write(markdown_table([r.as_dict() for r in rows], COLUMNS) + "\n")
    return jpath, mpath


def print_rows(rows: list[Row], title: str = "") -> None:
    print(format_table([r.as_dict() for r in rows], COLUMNS, title=title))
