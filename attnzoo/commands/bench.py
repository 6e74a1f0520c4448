"""Benchmark attnzoo's variants on this machine's GPU, each beside its peers in the same run: time (do_bench, host
included, and device time from CUDA graphs), TF/s, peak memory.

Each group writes <group>-<tag>.json and <group>-<tag>.md (device, commit, date, rows, the peers' rows, a summary)
into --out, and the run ends with one table of every row. --peers runs the shared peers_bench.py first, limited
to the peer groups of the chosen variants (--peer-groups overrides).

Example (GPU machine, repo root):
  attnzoo bench --variants dense,sparse --peers .device/peers_bench.py --out $OUT
  attnzoo bench --variants sparse --sections scaling --merge --out DIR   # add one section to DIR's sparse file
  attnzoo bench --variants sparse --sections sliding --smoke      # seconds on a CPU: checks the harness
  attnzoo bench --report benchmarks/results/sparse-h200.json      # rebuild the markdown from the JSON
"""
from __future__ import annotations

NAME = "bench"
HELP = "benchmark variants beside their peers (GPU): time, TF/s, peak memory"


def _groups_help() -> str:
    import importlib

    from ..bench import GROUPS

    lines = ["groups (--variants) and their sections (--sections):"]
    for name, module in GROUPS.items():
        try:
            mod = importlib.import_module(f"attnzoo.bench.{module}")
        except ImportError as e:  # a group whose module cannot load must not break the whole CLI
            lines.append(f"  {name}: (unavailable: {e})")
            continue
        lines.append(f"  {name}: {mod.TITLE}  [peers: {', '.join(mod.PEERS) or '-'}]")
        lines += [f"      {s}: {d}" for s, d in mod.SECTIONS.items()]
    return "\n".join(lines)


def _csv(values) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def add_arguments(p):
    from ..bench import GROUPS

    p.epilog = _groups_help()
    p.add_argument("--variants", nargs="+", default=["dense"], metavar="GROUP",
                   help=f"groups to run, comma- or space-separated: {', '.join(GROUPS)} (default: dense)")
    p.add_argument("--sections", nargs="+", metavar="SECTION",
                   help="run only these sections of the groups (default: all; listed below)")
    p.add_argument("--peers", metavar="PATH", help="path to the shared peers_bench.py, run first in the same session")
    p.add_argument("--peer-groups", nargs="+", metavar="GROUP",
                   help="peers_bench.py groups to run (default: those of the chosen variants, e.g. ceiling,dense)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the results (default: %(default)s)")
    p.add_argument("--tag", help="file name tag after the group name (default: the device, e.g. h200, h100, cpu)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the sections not run now from the group's file already in --out (a long "
                   "group in several calls)")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the device-time (CUDA graph) measurement")
    p.add_argument("--profile", action="store_true",
                   help="also run each case's step under torch.profiler and list where its time goes (the largest "
                   "kernels on a GPU, operators on the CPU) in the markdown")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU in seconds (checks the harness)")
    p.add_argument("--report", metavar="JSON", help="only rebuild the markdown (and charts) from a result JSON")


def run(args) -> int:
    import os

    import torch

    from .. import bench

    if args.report:
        print("wrote", bench.report(args.report))
        return 0
    groups = _csv(args.variants)
    for g in groups:
        bench.load_group(g)  # unknown names: one line naming the valid groups, before anything runs
    if args.peers and not os.path.isfile(args.peers):
        raise FileNotFoundError(f"--peers {args.peers!r}: no such file (a copy of the shared bench/peers_bench.py)")
    if not torch.cuda.is_available() and not args.smoke:
        raise ValueError("no CUDA GPU found; the timings are meant for a GPU (--smoke checks the harness on the CPU)")
    bench.run(groups, smoke=args.smoke, sections=set(_csv(args.sections)) if args.sections else None,
              peers=args.peers, peer_groups=_csv(args.peer_groups) if args.peer_groups else None, out_dir=args.out,
              tag=args.tag, cuda_graph=not args.no_cuda_graph, merge=args.merge,
              profile=args.profile)
    return 0
