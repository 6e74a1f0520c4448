"""A tour of the zoo on this machine: every registered variant is built, run forward and
backward on a small batch, checked against the eager reference, and summarised in a table."""
from __future__ import annotations

NAME = "demo"
HELP = "run the built-in demo (offline, CPU friendly)"


def add_arguments(p):
    p.add_argument("--seq", type=int, default=64, help="sequence length of the sample batch")


def run(args) -> int:
    import time

    import torch

    from .. import kv_cache_bytes, ops, registry
    from ..table import format_table

    if args.seq < 1:
        raise ValueError(f"--seq={args.seq}: expected a positive integer")
    torch.manual_seed(0)
    rows = []
    for name in registry.list_variants():
        e = registry.get(name)
        m = registry.create(name, **e.example)
        x = torch.randn(2, args.seq, e.example["dim"], requires_grad=True)
        t = time.perf_counter()
        y = m(x)
        y.sum().backward()
        ms = (time.perf_counter() - t) * 1e3
        backend = ops.last_decision().backend if ops.last_decision() else "-"
        with ops.use_backend("eager"), torch.no_grad():
            err = (m(x) - y).abs().max().item()
        rows.append({"variant": name, "params": sum(p.numel() for p in m.parameters()), "backend": backend,
                     "fwd+bwd ms": round(ms, 2), "max |fused - eager|": err,
                     "KV bytes/token (fp16)": kv_cache_bytes(m, 1, dtype=torch.float16)})
    print(format_table(rows, title=f"attnzoo demo: {len(rows)} variants, batch 2 x {args.seq} tokens, "
                                   f"{'GPU' if torch.cuda.is_available() else 'CPU'}"))
    return 0
