"""Benchmark attnzoo's attention ops and modules on this machine's GPU (medians of device
events), optionally with the peer implementations in the same run.

Example (GPU machine):  attnzoo bench --variants dense --peers benchmarks/peers/peers_bench.py --out results/
"""
from __future__ import annotations

NAME = "bench"
HELP = "benchmark ops and modules (and peers) on the GPU"


def add_arguments(p):
    p.add_argument("--variants", nargs="+", default=["dense"], help="case groups to run (default: dense)")
    p.add_argument("--peers", metavar="SCRIPT", help="path to the shared peers_bench.py, run in the same session")
    p.add_argument("--peer-groups", default="", help="comma-separated peer groups (peers_bench.py --only), "
                   "e.g. ceiling,dense,longformer")
    p.add_argument("--out", default="benchmarks/results", help="directory for bench.jsonl and bench.md")
    p.add_argument("--stem", default="bench", help="file name stem of the results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU in seconds (checks the harness)")


def run(args) -> int:
    import torch

    from .. import bench

    if not torch.cuda.is_available() and not args.smoke:
        raise ValueError("attnzoo bench: no CUDA GPU found; the timings are meant for a GPU (use --smoke to check "
                         "the harness on the CPU)")
    bench.run(args.variants, smoke=args.smoke, peers=args.peers, peer_groups=args.peer_groups, out_dir=args.out, stem=args.stem)
    return 0
