"""``attnzoo bench``: time attnzoo's ops and modules (and the peers) on the GPU.

Groups of cases live in one module each (:mod:`attnzoo.bench.dense`, ...). Results go
to ``--out`` as JSON lines and a markdown table; ``--peers SCRIPT`` runs the shared
peers benchmark in the same run, so both land on one machine, one date.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .record import Row, print_rows, write_results

__all__ = ["GROUPS", "run"]


def _dense(smoke):
    from .dense import run_dense

    return run_dense(smoke)


GROUPS = {"dense": _dense}


def _peers(script: str, smoke: bool, out_dir: str, only: str = "") -> list[Row]:
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--peers {script!r}: no such file (copy shared/bench/peers_bench.py there)")
    env = dict(os.environ, OUT=out_dir)
    cmd = [sys.executable, script] + (["--smoke"] if smoke else []) + (["--only", only] if only else [])
    print("running peers:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=False)
    rows = []
    path = os.path.join(out_dir, "peers.jsonl")
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            rows.append(Row("peer:" + r["group"], r["name"], r["n"], r["mode"], r["ms"], r.get("tflops"),
                            r.get("peak_mem_mb"), "", r.get("error", "")))
    return rows


def run(groups: list[str], *, smoke: bool = False, peers: str | None = None, peer_groups: str = "",
        out_dir: str = "benchmarks/results", stem: str = "bench") -> list[Row]:
    from ..errors import check_choice

    for g in groups:
        check_choice("--variants", g, GROUPS)
    rows: list[Row] = []
    for g in groups:
        rows += GROUPS[g](smoke)
    if peers:
        rows += _peers(peers, smoke, out_dir, peer_groups)
    jpath, mpath = write_results(rows, out_dir, stem)
    print_rows(rows, title=f"attnzoo bench ({', '.join(groups)})")
    print(f"\nwrote {jpath} and {mpath}")
    return rows
