#!/usr/bin/env python3
"""Benchmark attnzoo's sparse attention against FlexAttention with a plain mask_mod and dense cuDNN SDPA.

Run on a GPU machine from the repo root (torch, triton and transformers installed):

    python benchmarks/sparse_bench.py --out $OUT          # everything, bf16, ~5-8 minutes
    python benchmarks/sparse_bench.py --smoke             # CPU, tiny N: checks the script itself

Shapes follow shared/bench/peers_bench.py: hidden 768, 12 heads (head_dim 64), batch 1, bf16, each
case timed forward and forward+backward *including the qkv projection* (one Linear 768 -> 2304,
viewed and permuted to q, k, v), the backward through ``out.float().sum()``; median of
``triton.testing.do_bench`` ("ms": host launch time included, as the peers are timed) and, on CUDA, of
``triton.testing.do_bench_cudagraph`` ("gpu_ms": the same step replayed from a CUDA graph, i.e. device time
with no host gaps, what a step costs when a larger model keeps the GPU busy). "±256" is ``window=256``,
peers_bench's ``W=512``/``(qi-ki).abs() <= 256``.

Groups (``--groups``, default all):
  sliding   N=16384, ±256: attnzoo's op (what dispatch picks, then forced triton and flex), attnzoo longformer
            (±256 + 1 global token), the full sliding_window module, FlexAttention with a plain mask_mod (built
            here as peers_bench does), the op and that FlexAttention on the attention alone (same leaf q, k, v),
            dense cuDNN (+qkv and alone), the projection alone; "ideal" = kept x dense attention (+ projection).
            Where FlashAttention-4 (flash-attn-4) imports, also its own local attention.
  bigbird   block 64, window 3 blocks, 2 global, 3 random; N = 4096, 8192, 16384 (dispatch, triton, flex on
            128-tiles); vs dense cuDNN.
  scaling   N = 4k ... 128k, sliding ±256 (what dispatch picks) vs dense cuDNN, time and peak memory.
  autotune  (not in the default run: minutes of compiling) the sliding and bigbird cases at N=16384 with
            FlexAttention compiled under Inductor's max-autotune; its AUTOTUNE tables (stderr) name the
            kernel configurations worth fixing as kernel_options.

Writes ``sparse_bench.json`` (rows) and ``sparse_bench.md`` (tables + target checks) to ``--out`` (default
``$OUT``, else ./bench-out). If ``peers.jsonl`` from peers_bench.py lies in the same folder (or ``--peers``),
the HF Longformer/BigBird ratios are checked too; ``--report`` rebuilds the tables from the JSON files
without running anything (run it after peers_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo's attnzoo, whatever is installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HID, NH = 768, 12
HD = HID // NH
WINDOW = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="output folder (default $OUT)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (checks the script)")
    p.add_argument("--groups", default="sliding,bigbird,scaling",
                   help="comma-separated: sliding,bigbird,scaling,autotune (default: all but autotune)")
    p.add_argument("--peers", default=None, help="peers.jsonl from shared/bench/peers_bench.py (default: in --out)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the JSON files")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.smoke = args.smoke
        self.dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        self.dt = torch.bfloat16 if self.dev == "cuda" else torch.float32
        if self.dev == "cpu":
            torch.set_num_threads(1)  # tiny smoke shapes: threads only add synchronization
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.rows: list[dict] = []
        path = os.path.join(self.out, "sparse_bench.json")
        if os.path.exists(path) and not args.smoke:  # a later run of other groups adds to the same file
            with open(path) as f:
                rerun = set(args.groups.split(","))
                self.rows = [r for r in json.load(f)["rows"] if r["group"] not in rerun]
        self.t0 = time.time()
        if self.dev == "cuda":
            import torch._dynamo as dynamo

            for knob in ("recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 4096))

    # ------------------------------------------------------------------ timing
    def time_ms(self, fn) -> float:
        if self.dev == "cuda":
            import triton.testing as tt

            return tt.do_bench(fn, warmup=25, rep=150, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def gpu_ms(self, fn) -> float | None:
        """Device time: ``fn`` replayed from a CUDA graph (no host launch cost between kernels), median ms.
        None off CUDA or where the call cannot be captured."""
        if self.dev != "cuda":
            return None
        import triton.testing as tt

        try:
            return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # e.g. a host sync inside: report the do_bench time only
            self.log(f"  (no CUDA graph time: {type(e).__name__}: {str(e)[:120]})")
            return None

    def log(self, msg):
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def run(self, group, name, n, make, flops_fwd=None, extra=None, modes=("fwd", "fwd+bwd"), grad_of=None):
        """``make() -> fn`` returning the output tensor; times fwd (no grad) and fwd+bwd. The backward goes
        through ``out.float().sum()``; with ``grad_of`` (``() -> inputs``) it is ``torch.autograd.grad(out,
        inputs, dO)`` with a fixed random dO instead: the attention's own kernels, no loss and no gradient
        accumulation, as attention kernels are usually compared."""
        for mode in modes:
            row = dict(group=group, name=name, n=n, mode=mode, **(extra or {}))
            fn = None
            try:
                if self.dev == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t = time.time()
                fwd = make()
                if mode == "fwd":
                    def fn():
                        with torch.no_grad():
                            return fwd()
                elif grad_of is None:
                    def fn():
                        fwd().float().sum().backward()
                else:
                    inputs = grad_of()
                    with torch.no_grad():
                        dout = torch.randn_like(fwd())

                    def fn():
                        torch.autograd.grad(fwd(), inputs, dout)
                fn()  # compile / first call, outside the timing
                if self.dev == "cuda":
                    torch.cuda.synchronize()
                    row["peak_mem_setup_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    torch.cuda.reset_peak_memory_stats()
                row["first_call_s"] = round(time.time() - t, 2)
                ms = self.time_ms(fn)
                row["ms"] = round(ms, 4)
                g = self.gpu_ms(fn)
                if g is not None:
                    row["gpu_ms"] = round(g, 4)
                if flops_fwd:
                    row["tflops"] = round(flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0) / ms / 1e9, 1)
                if self.dev == "cuda":
                    row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except Exception as e:  # one case failing must not hide the others
                row["ms"] = float("nan")
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=3)
            finally:
                fn = fwd = None  # noqa: F841
            self.rows.append(row)
            self.log(json.dumps(row))
            self.save()

    def save(self):
        with open(os.path.join(self.out, "sparse_bench.json"), "w") as f:
            json.dump({"device": device_info(), "rows": self.rows}, f, indent=1)

    # ------------------------------------------------------------------ inputs
    def projected(self, n):
        """x [1, n, 768] -> one Linear to 2304 -> q, k, v [1, 12, n, 64] (strided views), as the peers."""
        lin = torch.nn.Linear(HID, 3 * HID, device=self.dev, dtype=self.dt)
        x = torch.randn(1, n, HID, device=self.dev, dtype=self.dt, requires_grad=True)

        def qkv():
            return lin(x).view(1, n, 3, NH, HD).permute(2, 0, 3, 1, 4)
        return qkv


def device_info() -> dict:
    info = {"torch": torch.__version__}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        info["flash-attn-4"] = version("flash-attn-4")
    except Exception:  # noqa: BLE001 - not installed
        info["flash-attn-4"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
    info["commit"] = os.environ.get("ATTNZOO_COMMIT", "")  # set by the caller where the tree has no .git
    if not info["commit"]:
        try:
            import subprocess
            info["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
        except OSError:
            pass
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return info


# ---------------------------------------------------------------------------- cases
def attn_flops(kept_pairs: int) -> float:
    return 4.0 * NH * kept_pairs * HD


def dense_case(b: Bench, group, n):
    qkv = b.projected(n)

    def make():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = [SDPBackend.CUDNN_ATTENTION] if b.dev == "cuda" else [SDPBackend.MATH]

        def f():
            q, k, v = qkv()
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v)
        return f
    b.run(group, "dense cuDNN SDPA (+qkv)" if b.dev == "cuda" else "dense SDPA math (+qkv)", n, make,
          attn_flops(n * n), {"kept": 1.0})


def op_case(b: Bench, group, name, n, pattern, **op_kw):
    from attnzoo.ops import sparse_attention
    from attnzoo.ops.sparse import compile_layout, layout

    tile = op_kw.get("tile") or layout.DEFAULT_TILE
    t = time.time()
    layout._compile(pattern.bind(n, b.dev), tile)  # a fresh build, timed (the op's cached one is reused below)
    if b.dev == "cuda":
        torch.cuda.synchronize()
    build_ms = (time.time() - t) * 1e3
    lay = compile_layout(pattern, n, tile, b.dev)
    qkv = b.projected(n)

    def make():
        def f():
            q, k, v = qkv()
            return sparse_attention(q, k, v, pattern, **op_kw)
        return f
    extra = {"kept": round(lay.density, 5), "tiles_visited": lay.tiles_visited, "tiles_full": lay.tiles_full,
             "tile_density": round(lay.tile_density(), 5), "layout_build_ms": round(build_ms, 1),
             "pattern": pattern.describe()}
    b.run(group, name, n, make, attn_flops(lay.kept_total), extra)
    from attnzoo.ops import last_sparse_decision
    d = last_sparse_decision()
    if d is not None:
        b.rows[-1]["backend"] = d.backend
        b.rows[-2]["backend"] = d.backend


def band_counts(n, window) -> tuple[float, dict]:
    """(forward FLOPs, row extras) of a ±window band over n positions: what the sliding rows report."""
    kept = sum(min(n - 1, i + window) - max(0, i - window) + 1 for i in range(n))
    return attn_flops(kept), {"kept": round(kept / n / n, 5)}


def flex_mask_mod_case(b: Bench, group, n, window, qkv=None, name="flex plain mask_mod (+qkv)", **run_kw):
    """FlexAttention with a plain mask_mod, built as shared/bench/peers_bench.py builds it, on ``qkv()``
    (default: the projection, as the peers); ``run_kw`` go to :meth:`Bench.run`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if b.dev == "cuda" else flex_attention
    qkv = qkv or b.projected(n)

    def make():
        bm = create_block_mask(lambda bb, h, qi, ki: (qi - ki).abs() <= window, None, None, n, n, device=b.dev)

        def f():
            q, k, v = qkv()
            return flex(q, k, v, block_mask=bm)
        return f
    b.run(group, name, n, make, *band_counts(n, window), **run_kw)


def module_case(b: Bench, group, n, window):
    import attnzoo

    m = attnzoo.create("sliding_window", dim=HID, heads=NH, window=window).to(b.dev, b.dt)
    x = torch.randn(1, n, HID, device=b.dev, dtype=b.dt, requires_grad=True)
    b.run(group, "attnzoo sliding_window module (q/k/v/o proj)", n, lambda: (lambda: m(x)), *band_counts(n, window))


def flash4_case(b: Bench, group, n, window, qkv, **run_kw):
    """FlashAttention-4's own local attention (``flash_attn.cute.flash_attn_func``, ``window_size=(w, w)``), forward
    and backward its own, on the same q, k, v (views in its [B, N, H, D] layout, no copies). Skipped unless it
    imports."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - not installed (or not importable here)
        b.log(f"  (no FlashAttention-4 row: {type(e).__name__}: {str(e)[:120]})")
        return

    def make():
        q, k, v = qkv()

        def f():
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=(window, window))
            return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)
        return f
    b.run(group, "FlashAttention-4 local window, kernels, dO given", n, make, *band_counts(n, window), **run_kw)


def alone_cases(b: Bench, group, n, pattern, window):
    """attnzoo's op and FlashAttention with a plain mask_mod on the same q, k, v ``[1, 12, n, 64]`` (leaves, no
    projection): backward through the loss as the other rows, then given dO (the kernels alone: the op's forward
    and backward and nothing else, the reading the ">= 1.5x faster than FlexAttention" target is judged on, see
    docs/sparse.md "Benchmark"; the loss rows add the same cast, sum and their backward to both sides). Where
    FlashAttention-4 imports, also its own local attention (forward and backward)."""
    from attnzoo.ops import sparse_attention

    q, k, v = (torch.randn(1, NH, n, HD, device=b.dev, dtype=b.dt, requires_grad=True) for _ in range(3))
    given = {"modes": ("fwd+bwd",), "grad_of": lambda: (q, k, v)}
    flops, extra = band_counts(n, window)
    for suffix, kw in (("attention alone", {}), ("kernels, dO given", given)):
        b.run(group, f"attnzoo sliding_window op, {suffix}", n,
              lambda: (lambda: sparse_attention(q, k, v, pattern)), flops, extra, **kw)
        if b.dev == "cuda":  # eager FlexAttention has no backward off CUDA
            flex_mask_mod_case(b, group, n, window, qkv=lambda: (q, k, v), name=f"flex plain mask_mod, {suffix}",
                               **kw)
    if b.dev == "cuda":
        flash4_case(b, group, n, window, lambda: (q, k, v), **given)


def proj_case(b: Bench, group, n):
    """The q/k/v projection alone (Linear 768 -> 2304 and the views), the part of every (+qkv) row that is not
    attention: the ideal of a sparse row is this plus the kept fraction of dense attention."""
    qkv = b.projected(n)
    b.run(group, "qkv projection alone", n, lambda: (lambda: qkv()[0]), None, {"kept": 0.0})


def dense_attention_case(b: Bench, group, n):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if b.dev != "cuda":
        return
    q, k, v = (torch.randn(1, NH, n, HD, device=b.dev, dtype=b.dt, requires_grad=True) for _ in range(3))

    def make():
        def f():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return f
    b.run(group, "dense cuDNN SDPA, attention alone", n, make, attn_flops(n * n), {"kept": 1.0})


def group_sliding(b: Bench):
    from attnzoo.ops.sparse import Longformer, SlidingWindow

    n = 384 if b.smoke else 16384
    w = 16 if b.smoke else WINDOW
    pattern = SlidingWindow(window=w)
    op_case(b, "sliding", "attnzoo sliding_window op (+qkv)", n, pattern)  # what dispatch picks
    if b.dev == "cuda":
        for be in ("triton", "flex"):
            op_case(b, "sliding", f"attnzoo sliding_window op, {be} (+qkv)", n, pattern, backend=be)
    op_case(b, "sliding", "attnzoo longformer op, 1 global token (+qkv)", n, Longformer(window=w, global_tokens=1))
    module_case(b, "sliding", n, w)
    flex_mask_mod_case(b, "sliding", n, w)
    alone_cases(b, "sliding", n, pattern, w)
    dense_case(b, "sliding", n)
    dense_attention_case(b, "sliding", n)
    proj_case(b, "sliding", n)


def group_bigbird(b: Bench):
    from attnzoo.ops.sparse import BigBird

    blk = 16 if b.smoke else 64
    for n in ([256, 512] if b.smoke else [4096, 8192, 16384]):
        pattern = BigBird(block_size=blk, window=blk, global_blocks=2, random_blocks=3)
        op_case(b, "bigbird", "attnzoo bigbird op (+qkv)", n, pattern)
        if b.dev == "cuda":
            op_case(b, "bigbird", "attnzoo bigbird op, triton (+qkv)", n, pattern, backend="triton")
            op_case(b, "bigbird", "attnzoo bigbird op, flex 128-tiles (+qkv)", n, pattern, backend="flex", tile=128)
        dense_case(b, "bigbird", n)


def group_autotune(b: Bench):
    """Inductor's max-autotune over FlexAttention's kernel configurations for the sliding and bigbird
    cases at N=16384 (minutes of compiling; its AUTOTUNE tables on stderr name the winning configs)."""
    from attnzoo.ops.sparse import BigBird, SlidingWindow, use_sparse_kernel_options

    if b.dev != "cuda":
        b.log("autotune: CUDA only, skipped")
        return
    with use_sparse_kernel_options(flex_compile_mode="max-autotune-no-cudagraphs"):
        op_case(b, "autotune", "attnzoo sliding_window op, flex max-autotune (+qkv)", 16384,
                SlidingWindow(window=WINDOW), backend="flex")
        op_case(b, "autotune", "attnzoo bigbird op, flex max-autotune (+qkv)", 16384,
                BigBird(block_size=64, window=64, global_blocks=2, random_blocks=3), backend="flex")


def group_scaling(b: Bench):
    from attnzoo.ops.sparse import SlidingWindow

    w = 16 if b.smoke else WINDOW
    for n in ([128, 256] if b.smoke else [4096, 8192, 16384, 32768, 65536, 131072]):
        op_case(b, "scaling", "attnzoo sliding_window op (+qkv)", n, SlidingWindow(window=w))
        dense_case(b, "scaling", n)


# ---------------------------------------------------------------------------- report
def _find(rows, group, prefix, n, mode):
    for r in rows:
        if r["group"] == group and r["name"].startswith(prefix) and r["n"] == n and r["mode"] == mode \
                and r.get("ms") == r.get("ms"):  # not NaN
            return r
    return None


def report(out_dir: str, peers_path: str | None) -> str:
    from attnzoo.table import markdown_table

    with open(os.path.join(out_dir, "sparse_bench.json")) as f:
        data = json.load(f)
    rows = data["rows"]
    peers = []
    peers_path = peers_path or os.path.join(out_dir, "peers.jsonl")
    if os.path.exists(peers_path):
        with open(peers_path) as f:
            peers = [json.loads(line) for line in f if line.strip()]
    lines = [f"# attnzoo sparse benchmark\n\n{json.dumps(data['device'])}\n"]
    cols = ["name", "n", "mode", "ms", "gpu_ms", "tflops", "peak_mem_mb", "kept", "tiles_visited", "tiles_full",
            "layout_build_ms", "backend", "backward", "error"]
    for group in ("sliding", "bigbird", "scaling", "autotune"):
        g = [r for r in rows if r["group"] == group]
        if g:
            lines += [f"\n## {group}\n", markdown_table(g, [c for c in cols if any(c in r for r in g)])]
    # ideal = kept fraction x dense attention alone + the projection alone (shared/PEERS.md: "the ideal sparse
    # kernel approaches 3% of the dense time plus the projections"); where those rows are missing (bigbird and
    # scaling groups), dense (+qkv) time x kept, which is lower still
    ideal = []
    for r in rows:
        if r["name"].startswith("attnzoo") and "kept" in r and r.get("ms") == r.get("ms"):
            d = next((x for x in rows if x["group"] == r["group"] and x["name"].startswith("dense")
                      and x["name"].endswith("(+qkv)") and x["n"] == r["n"] and x["mode"] == r["mode"]
                      and x.get("ms") == x.get("ms")), None)
            da = _find(rows, r["group"], "dense cuDNN SDPA, attention alone", r["n"], r["mode"])
            pj = _find(rows, r["group"], "qkv projection alone", r["n"], r["mode"])
            if da and "attention alone" in r["name"]:
                ideal_ms, how = da["ms"] * r["kept"], "kept x attention"
            elif da and pj:
                ideal_ms, how = da["ms"] * r["kept"] + pj["ms"], "kept x attention + projection"
            elif d:
                ideal_ms, how = d["ms"] * r["kept"], "kept x dense(+qkv)"
            else:
                continue
            ideal.append({"group": r["group"], "name": r["name"], "n": r["n"], "mode": r["mode"], "ms": r["ms"],
                          "dense ms": d["ms"] if d else None, "ideal ms": round(ideal_ms, 4), "ideal": how,
                          "x ideal": round(r["ms"] / ideal_ms, 2),
                          "speedup vs dense": round(d["ms"] / r["ms"], 2) if d else None})
    if ideal:
        lines += ["\n## against dense and the ideal\n", markdown_table(ideal)]
    lines += ["\n## targets\n"] + _targets(rows, peers)
    chart = plot_scaling(rows, os.path.join(out_dir, "sparse_scaling.png"))
    if chart:
        lines.append(f"\n![scaling]({os.path.basename(chart)})")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "sparse_bench.md"), "w") as f:
        f.write(text)
    return text


def plot_scaling(rows, path: str) -> str | None:
    """Log-log chart of the scaling group (time and peak memory vs N, forward+backward): the sparse op against
    dense cuDNN. Returns the path, or None without matplotlib or scaling rows."""
    pts = [r for r in rows if r["group"] == "scaling" and r["mode"] == "fwd+bwd" and r.get("ms") == r.get("ms")]
    if not pts:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("attnzoo sliding_window op (+qkv)", "o-"), ("dense cuDNN SDPA (+qkv)", "s--")):
        sel = sorted((r for r in pts if r["name"] == name), key=lambda r: r["n"])
        if not sel:
            continue
        axes[0].plot([r["n"] for r in sel], [r.get("gpu_ms") or r["ms"] for r in sel], style, label=name)
        mem = [r for r in sel if r.get("peak_mem_mb")]  # measured on CUDA only
        if mem:
            axes[1].plot([r["n"] for r in mem], [r["peak_mem_mb"] for r in mem], style, label=name)
    for ax, ylabel in zip(axes, ("forward+backward ms (device time)", "peak memory MB")):
        if not ax.lines:
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("sliding window ±256 vs dense attention (bf16, hidden 768, 12 heads, batch 1, +qkv projection)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _targets(rows, peers) -> list[str]:
    out = []

    def check(label, ok, detail):
        out.append(f"- [{'x' if ok else ' '}] {label}: {detail}")

    n = 16384
    for mode in ("fwd", "fwd+bwd"):
        best = _find(rows, "sliding", "attnzoo sliding_window op (+qkv)", n, mode)  # what dispatch picks
        if best is None:
            continue
        variants = [r for r in rows if r["name"].startswith("attnzoo sliding_window op, ") and r["n"] == n
                    and r["mode"] == mode and r.get("ms") == r.get("ms")]
        for r in variants:
            out.append(f"- {r['name']} {mode}: {r['ms']:.3f} ms")
        da = _find(rows, "sliding", "dense cuDNN SDPA, attention alone", n, mode)
        pj = _find(rows, "sliding", "qkv projection alone", n, mode)
        pairs = [(best, _find(rows, "sliding", "flex plain mask_mod (+qkv)", n, mode), "+qkv")]
        for what in ("attention alone", "kernels, dO given"):
            pairs.append((_find(rows, "sliding", f"attnzoo sliding_window op, {what}", n, mode),
                          _find(rows, "sliding", f"flex plain mask_mod, {what}", n, mode), what))
        for ours, flex, what in pairs:
            if not (ours and flex):
                continue
            for key, clock in (("ms", "do_bench"), ("gpu_ms", "CUDA graph")):
                if ours.get(key) and flex.get(key):
                    check(f"sliding ±256 N={n} {mode} ({what}, {clock}) >= 1.5x faster than flex mask_mod",
                          flex[key] / ours[key] >= 1.5,
                          f"{ours[key]:.3f} ms vs {flex[key]:.3f} ms: {flex[key] / ours[key]:.2f}x")
        kernels = pairs[-1][0]  # the op with what it picks, kernels alone (dO given)
        for name, label in (("FlashAttention-4 local window, kernels, dO given",
                             "FlashAttention-4's own local attention (its forward and backward)"),):
            other = _find(rows, "sliding", name, n, mode)
            if other and kernels and other.get("gpu_ms") and kernels.get("gpu_ms"):
                fx = pairs[-1][1]
                out.append(f"- {label}, kernels, dO given, CUDA graph: {other['gpu_ms']:.3f} ms; the op as dispatched "
                           f"{kernels['gpu_ms']:.3f} ms ({other['gpu_ms'] / kernels['gpu_ms']:.2f}x its time)"
                           + (f"; flex mask_mod / it = {fx['gpu_ms'] / other['gpu_ms']:.2f}x"
                              if fx and fx.get("gpu_ms") else ""))
        if da and pj:
            ideal = da["ms"] * best["kept"] + pj["ms"]
            check(f"sliding ±256 N={n} {mode} within 3x of ideal", best["ms"] <= 3 * ideal,
                  f"{best['ms']:.3f} ms vs ideal {ideal:.3f} ms ({best['kept']:.4f} x {da['ms']:.3f} ms attention "
                  f"+ {pj['ms']:.3f} ms projection): {best['ms'] / ideal:.2f}x")
        hf = [p for p in peers if p.get("name") == "hf-LongformerSelfAttention" and p.get("n") == n
              and p.get("mode") == mode and p.get("ms") == p.get("ms")]
        if hf:
            check(f"sliding ±256 N={n} {mode} >= 10x faster than HF Longformer", hf[0]["ms"] / best["ms"] >= 10,
                  f"{hf[0]['ms']:.3f} ms / {best['ms']:.3f} ms = {hf[0]['ms'] / best['ms']:.1f}x")
    for r in rows:
        if r["group"] != "bigbird" or not r["name"].startswith("attnzoo") or r.get("ms") != r.get("ms"):
            continue
        dense = _find(rows, "bigbird", "dense", r["n"], r["mode"])
        if dense and r["n"] >= 8192:
            check(f"{r['name']} N={r['n']} {r['mode']} faster than dense cuDNN", r["ms"] < dense["ms"],
                  f"{r['ms']:.3f} ms vs {dense['ms']:.3f} ms (do_bench)" + (
                      f"; CUDA graph {r['gpu_ms']:.3f} vs {dense['gpu_ms']:.3f} ms"
                      if r.get("gpu_ms") and dense.get("gpu_ms") else ""))
        hf = [p for p in peers if p.get("name") == "hf-BigBirdBlockSparseAttention" and p.get("n") == r["n"]
              and p.get("mode") == r["mode"] and p.get("ms") == p.get("ms")]
        if hf:
            check(f"{r['name']} N={r['n']} {r['mode']} >= 10x faster than HF BigBird", hf[0]["ms"] / r["ms"] >= 10,
                  f"{hf[0]['ms']:.3f} ms / {r['ms']:.3f} ms = {hf[0]['ms'] / r['ms']:.1f}x")
    if not peers:
        out.append("- (no peers.jsonl next to the results: HF ratios not checked; run shared/bench/peers_bench.py "
                   "with the same $OUT, then `python benchmarks/sparse_bench.py --report --out $OUT`)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.report:
        b = Bench(args)
        b.log(f"device {b.dev}, dtype {b.dt}, out {b.out}: {json.dumps(device_info())}")
        groups = {"sliding": group_sliding, "bigbird": group_bigbird, "scaling": group_scaling,
                  "autotune": group_autotune}
        for name in filter(None, args.groups.split(",")):
            if name not in groups:
                raise SystemExit(f"--groups: unknown group {name!r}; expected some of {', '.join(groups)}")
            b.log(f"== {name}")
            groups[name](b)
        b.save()
    print(report(args.out, args.peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
