#!/usr/bin/env python3
"""GPU: host time of the sparse op's default path against the same op forced to ``triton`` and FlexAttention.

The case of issue 17: sliding window ±256 at N=16384, hidden 768, 12 heads (head_dim 64), batch 1, bf16, forward
and backward *with the q/k/v projection* (one Linear 768 -> 2304 viewed as q, k, v, no copies), the backward
through ``out.float().sum()``. Each row is timed three ways:

* ``do_bench``: ``triton.testing.do_bench`` median (host and device: what a step costs when the host is the limit);
* ``device``: ``triton.testing.do_bench_cudagraph`` median (the same step replayed from a CUDA graph: device time);
* ``host``: host time per step while the GPU is kept busy (a long sleep kernel queued first, so the host never
  waits): how long Python, PyTorch and the launches take to issue one step.

Rows: the op as dispatched (default), the op forced to ``triton``, FlexAttention with a plain ``mask_mod`` (built
as the peers build it), the op forced to ``triton`` without the fixed softmax reference (one launch fewer), the
step under ``torch.compile`` (the op's kernels as custom ops), and, where flash-attn-4 imports, the op forced to
``flash_attn_cute``. Cases run in a rotated order over ``--rounds`` rounds; the table gives each case's median.

Run on a GPU machine from the repo root (nothing to install beyond torch + triton):

    python benchmarks/sparse_host_check.py                  # ~2-4 minutes on an H100 (tuning, compiles)
    python benchmarks/sparse_host_check.py --profile        # + where the default path's host time goes (cProfile)
    python benchmarks/sparse_host_check.py --n 4096 --rounds 3 --json $OUT/host_check.json

It checks, too, that the default path chose ``triton`` and matches the forced path bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnzoo

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile 30 default-path steps (host side)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def host_ms(fn, steps: int = 30) -> float:
    """Host time per call of ``fn`` with the GPU kept busy: a sleep kernel long enough to cover the loop is queued
    first, so no call waits for the device; the loop's wall time divided by ``steps`` (few enough steps that their
    ~15 kernels each stay within CUDA's queue of pending launches)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0  # a generous bound of one step
    torch.cuda._sleep(int(max(one * steps * 3, 0.05) * 2e9))  # ~2 GHz: enough cycles to outlast the loop
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / steps * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton.testing as tt
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnzoo.ops import last_sparse_decision, sparse_attention
    from attnzoo.ops.sparse import SlidingWindow, use_sparse_kernel_options

    torch.manual_seed(0)
    n, w, hid, nh = args.n, args.window, args.hidden, args.heads
    hd = hid // nh
    dev, dt = "cuda", torch.bfloat16
    lin = torch.nn.Linear(hid, 3 * hid, device=dev, dtype=dt)
    x = torch.randn(1, n, hid, device=dev, dtype=dt, requires_grad=True)
    pattern = SlidingWindow(window=w)

    def qkv():
        return lin(x).view(1, n, 3, nh, hd).permute(2, 0, 3, 1, 4)

    def op(**kw):
        def step():
            q, k, v = qkv()
            sparse_attention(q, k, v, pattern, **kw).float().sum().backward()
        return step

    def no_fixed():
        inner = op(backend="triton")

        def step():
            with use_sparse_kernel_options(fixed_reference=False):
                inner()
        return step

    flex = torch.compile(flex_attention)
    bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= w, None, None, n, n, device=dev)

    def flex_step():
        q, k, v = qkv()
        flex(q, k, v, block_mask=bm).float().sum().backward()

    cases = {"attnzoo op, default dispatch": op(), "attnzoo op, forced triton": op(backend="triton"),
             "FlexAttention, plain mask_mod": flex_step,
             "attnzoo op, forced triton, fixed_reference=False": no_fixed()}
    if not args.no_compile:
        def compiled_step_fn():
            q, k, v = qkv()
            return sparse_attention(q, k, v, pattern, backend="triton").float().sum()
        compiled = torch.compile(compiled_step_fn)
        cases["attnzoo op, forced triton, under torch.compile (custom ops)"] = lambda: compiled().backward()
    try:
        import flash_attn.cute  # noqa: F401
        cases["attnzoo op, forced flash_attn_cute (FlashAttention-4)"] = op(backend="flash_attn_cute")
    except Exception:  # noqa: BLE001 - not installed: no row
        pass

    # correctness and what dispatch picks, before timing
    with torch.no_grad():
        q, k, v = qkv()
        a = sparse_attention(q, k, v, pattern)
        chosen = last_sparse_decision().backend
        b = sparse_attention(q, k, v, pattern, backend="triton")
    print(f"default dispatch chose: {chosen}; same bits as forced triton: {torch.equal(a, b)}")

    broken: dict[str, str] = {}
    for name, fn in cases.items():  # first calls: tuning, compiles
        t = time.time()
        try:
            fn()
            torch.cuda.synchronize()
            print(f"warm-up {name}: {time.time() - t:.1f} s")
        except Exception as e:  # noqa: BLE001 - one case failing must not hide the others
            broken[name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"warm-up {name}: FAILED {broken[name]}")
    names = [c for c in cases if c not in broken]
    results: dict[str, dict[str, list[float]]] = {c: {"do_bench": [], "device": [], "host": []} for c in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = cases[name]
            results[name]["do_bench"].append(tt.do_bench(fn, warmup=25, rep=150, return_mode="median"))
            try:
                results[name]["device"].append(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
            except Exception as e:  # noqa: BLE001 - e.g. not capturable
                broken.setdefault(name + " (CUDA graph)", f"{type(e).__name__}: {str(e)[:200]}")
            results[name]["host"].append(host_ms(fn))
        print(f"round {r + 1}/{args.rounds} done")

    def med(xs):
        return f"{statistics.median(xs):.3f}" if xs else "-"

    print(f"\nsliding ±{w}, N={n}, hidden {hid}, {nh} heads, bf16, fwd+bwd with the projection; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; medians of {args.rounds} rounds (ms)\n")
    print("| case | do_bench | device (CUDA graph) | host per step |")
    print("|---|---|---|---|")
    rows = []
    for name in names:
        rr = results[name]
        print(f"| {name} | {med(rr['do_bench'])} | {med(rr['device'])} | {med(rr['host'])} |")
        rows.append({"case": name, **{k: (statistics.median(v) if v else None) for k, v in rr.items()}})
    for name, why in broken.items():
        print(f"| {name} | failed: {why} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "window": w, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows, "failed": broken, "default_backend": chosen}, f, indent=1)

    if args.profile:
        import cProfile
        import pstats

        step = cases["attnzoo op, default dispatch"]
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e9 * 2))  # keep the GPU busy: the profile shows host work only
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            step()
        prof.disable()
        torch.cuda.synchronize()
        print("\nhost time of 30 default-path steps, by function (own time first):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
