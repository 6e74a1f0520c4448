"""The peers: public attention implementations timed by the shared ``peers_bench.py`` (``--peers PATH``), run in
the same session as attnzoo's groups so that both land on one machine, one date.

The script is not part of attnzoo (it lives in the project's shared folder; on a GPU machine it is copied to an
ignored path such as ``.device/peers_bench.py``). It takes ``--smoke`` and ``--only GROUP,...`` and writes
``$OUT/peers.jsonl``, one JSON object per case: ``group``, ``name``, ``n``, ``mode``, ``ms``, ``tflops``,
``peak_mem_mb``, ``error``, ``GBps``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .record import Row

__all__ = ["run_peers", "peer_row"]


def peer_row(d: dict) -> Row:
    """A line of ``peers.jsonl`` as a :class:`Row` in section ``peer:<group>``."""
    known = {"group", "name", "n", "mode", "ms", "tflops", "peak_mem_mb", "error", "GBps"}
    ms = d.get("ms")
    return Row("peer:" + str(d.get("group", "?")), str(d.get("name", "?")), int(d.get("n", 0)), str(d.get("mode", "")),
               float("nan") if ms is None else float(ms), tflops=d.get("tflops"), peak_mb=d.get("peak_mem_mb"),
               gbps=d.get("GBps"), error=d.get("error", ""), extra={k: v for k, v in d.items() if k not in known})


def run_peers(script: str, groups: list[str], *, smoke: bool = False, timeout_s: float | None = None) -> list[Row]:
    """Run ``script`` (``--only`` the peer ``groups``) in a child process; its rows, or ``[]`` if it wrote none.

    Its output goes to this process's stdout (one JSON line per case, then its table)."""
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--peers {script!r}: no such file (a copy of the shared bench/peers_bench.py)")
    with tempfile.TemporaryDirectory(prefix="attnzoo-peers-") as out:
        cmd = [sys.executable, script] + (["--smoke"] if smoke else []) + (["--only", ",".join(groups)] if groups
                                                                            else [])
        print("running peers:", " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, env=dict(os.environ, OUT=out), check=False, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        path = os.path.join(out, "peers.jsonl")
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [peer_row(json.loads(line)) for line in f if line.strip()]
        if rc != 0:
            print(f"peers: {script} exited with {rc}; {len(rows)} rows", flush=True)
        return rows
