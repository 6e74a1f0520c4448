#!/usr/bin/env python3
"""GPU: sweep MLA's split-KV decode kernel (variants x tile configs x split counts) and pick the best per shape.

Shapes: DeepSeek-V3's absorbed decode (128 query heads, one shared rope key, latent 512 + rope 64, bf16), batch 32
and 64, 8k / 16k / 32k cached tokens (the latent and the rope keys as two tensors, as transformers' cache holds
them). Space: ``value_split`` 1 | 2 (one program per head tile accumulating all 512 value columns, or two programs
with 256 each) x ``block_h`` 32 | 64 x ``block_n`` 16 | 32 | 64 x ``num_warps`` 4 | 8 x ``num_stages`` 1 | 2 | 3
(72 kernel configs) x split counts 1, 2, 4, 8, 16 and the heuristic's own.

How it stays within ~5 minutes on an H100 (``--budget-s``, default 270, bounds it; it reports what it reached):

1. compiles: every kernel config is compiled once, in parallel worker processes (``--workers``, default: CPUs -
   2, at most 12) on tiny inputs with the same specialisation, into Triton's on-disk cache; the sweep then loads
   them. Lengths and split counts are not specialised (one binary per config), so 72 x 2 (one piece or several)
   binaries in all; a config that does not fit the card (shared memory, registers) drops out here;
2. stage A: at each shape, every kernel config with the heuristic's split count for it;
3. stage B: at each shape, the ``--top`` (8) best of stage A with every split count;
4. stage C: the 3 best of stage B per shape timed again from a CUDA graph (``do_bench_cudagraph``: device time);
   the winner is the fastest there.

Every candidate is first checked against the float32-accumulated reference (``attnzoo.ops.mla.naive``,
``latent_attention_reference(compute_dtype=float32)``) on two of the sequences: max error <= 2e-2 of the
largest output (bf16), or it drops out. Timings: ``triton.testing.do_bench`` median (``--rep-ms``, L2 flushed
between calls). The copy ceiling: a 1 GiB device-to-device copy timed the same two ways in the same run (GB/s =
bytes read + written per second); a decode's GB/s counts the cache bytes it reads (``(512 + 64) x 2`` per token).
The library's current choice (:func:`attnzoo.ops.mla.triton_decode.plan`: table, tuned, heuristic) is timed too.

Run on a GPU machine from the repo root (needs torch + triton only):

    python benchmarks/mla_decode_sweep.py --out $OUT                       # table + $OUT/mla_decode_sweep.json
    python benchmarks/mla_decode_sweep.py --out $OUT --write-table         # + the winners into
                                                                           #   attnzoo/ops/mla/decode_configs.json
    python benchmarks/mla_decode_sweep.py --quick                          # B32-S8192 only, 24 configs

``--write-table`` replaces the entries of this card (same name) and shape family in the table and keeps the
others; ``--table PATH`` writes elsewhere (e.g. ``$OUT/decode_configs.json`` to copy back into the repo).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnzoo

import torch  # noqa: E402

HEADS, R, DR = 128, 512, 64
SHAPES = [(32, 8192), (64, 8192), (32, 16384), (64, 16384), (32, 32768), (64, 32768)]
SPLITS = (1, 2, 4, 8, 16)
DEV = "cuda"


def _cpu_check_mode() -> None:
    """``--cpu-check``: the whole flow on CPU under Triton's interpreter at toy widths (16 heads, 32 + 16), a few
    configs, wall-clock timers: a test of the script, not a measurement (tests/test_mla_decode.py runs it)."""
    global HEADS, R, DR, SHAPES, SPLITS, DEV
    HEADS, R, DR, SHAPES, SPLITS, DEV = 16, 32, 16, [(2, 128)], (1, 2), "cpu"


def _timer(fn, rep_ms: float) -> float:
    """Median ms of ``fn``: ``do_bench`` on the GPU, one call's wall clock under ``--cpu-check``."""
    if DEV == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=3, rep=rep_ms, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _graph_timer(fn, rep_ms: float) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (``do_bench_cudagraph``); the wall clock under --cpu-check."""
    if DEV == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return _timer(fn, rep_ms)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for mla_decode_sweep.json (and --table's default)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new measurements after this")
    p.add_argument("--top", type=int, default=8, help="stage A configs per shape that stage B tries every split for")
    p.add_argument("--rep-ms", type=float, default=15.0, help="do_bench repetition time per candidate")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPUs - 2, at most 12)")
    p.add_argument("--quick", action="store_true", help="B32-S8192 only, value_split x block_n x warps x stages")
    p.add_argument("--shapes", default=None, help="e.g. 32x8192,64x32768 (default: the six)")
    p.add_argument("--write-table", action="store_true", help="write the winners into the tuned table")
    p.add_argument("--table", default=None, help="the table to write (default: the one attnzoo reads)")
    p.add_argument("--cpu-check", action="store_true", help="run the flow on CPU at toy sizes (a test of the script)")
    return p.parse_args(argv)


def kernel_space(quick: bool) -> list[dict]:
    if DEV == "cpu":
        return [dict(value_split=vs, block_h=16, block_n=bn, num_warps=4, num_stages=1) for vs in (1, 2)
                for bn in (16, 32)]
    space = []
    for vs, bh, bn, w, st in itertools.product((1, 2), (32, 64), (16, 32, 64), (4, 8), (1, 2, 3)):
        if quick and (bh != 64 or st == 1):
            continue
        space.append(dict(value_split=vs, block_h=bh, block_n=bn, num_warps=w, num_stages=st))
    return space


def _name(k: dict) -> str:
    return (f"{'vhalf' if k['value_split'] == 2 else 'whole'}-h{k['block_h']}-n{k['block_n']}-w{k['num_warps']}"
            f"-s{k['num_stages']}")


# ------------------------------------------------------------------------------------------------ compiling
def _compile_worker(configs_json: str) -> None:
    """In a worker process: launch each config once on tiny inputs (one piece and two) so that Triton compiles it
    into its on-disk cache; print the ones that fail."""
    from attnzoo.ops.mla import triton_decode as td

    dev = torch.device("cuda")
    q = torch.randn(1, HEADS, 1, R, device=dev, dtype=torch.bfloat16)
    qr = torch.randn(1, HEADS, 1, DR, device=dev, dtype=torch.bfloat16)
    c = torch.randn(1, 1024, R, device=dev, dtype=torch.bfloat16)
    kr = torch.randn(1, 1024, 1, DR, device=dev, dtype=torch.bfloat16)
    out = torch.empty(1, HEADS, 1, R, device=dev, dtype=torch.bfloat16)
    for k in json.loads(configs_json):
        for splits in (1, 2):
            try:
                td._launch(q, qr, c, kr, None, 0.1, td.DecodeConfig(**k, splits=splits), out)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a config this card cannot run
                print(json.dumps({"failed": k, "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)
                break


def precompile(space: list[dict], workers: int) -> dict:
    """Compile the space in ``workers`` processes; returns {name: error} of the configs that failed."""
    chunks = [space[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--compile-worker", json.dumps(ch)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for ch in chunks if ch]
    failed = {}
    for p in procs:
        out, _ = p.communicate()
        for line in out.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "failed" in rec:
                failed[_name(rec["failed"])] = rec["error"]
    return failed


# ------------------------------------------------------------------------------------------------ timing
def copy_ceiling(rep_ms: float) -> dict:
    n = 1 << 30 if DEV == "cuda" else 1 << 24
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = _timer(lambda: dst.copy_(src), max(rep_ms, 50))
    gms = _graph_timer(lambda: dst.copy_(src), 50)
    return dict(ms=ms, gpu_ms=gms, gbps=2 * n / ms / 1e6, gbps_graph=2 * n / gms / 1e6)


class Shape:
    def __init__(self, batch: int, k_len: int):
        from attnzoo.ops.mla import latent_attention_reference

        self.batch, self.k_len = batch, k_len
        g = torch.Generator(device=DEV).manual_seed(batch * 100003 + k_len)
        bf = dict(device=DEV, dtype=torch.bfloat16)
        self.q = torch.randn(batch, HEADS, 1, R, generator=g, **bf) / 8
        self.qr = torch.randn(batch, HEADS, 1, DR, generator=g, **bf)
        self.c = torch.randn(batch, k_len, R, generator=g, **bf)
        self.kr = torch.randn(batch, k_len, 1, DR, generator=g, **bf)
        self.out = torch.empty(batch, HEADS, 1, R, **bf)
        self.scale = 192 ** -0.5
        with torch.no_grad():
            self.ref = latent_attention_reference(self.q[:2], self.qr[:2], self.c[:2], self.kr[:2], scale=self.scale,
                                                  compute_dtype=torch.float32).float()
        self.bytes = batch * k_len * (R + DR) * 2
        self.flops = batch * HEADS * k_len * 2 * (R + DR + R)

    @property
    def tag(self) -> str:
        return f"B{self.batch}-S{self.k_len}"

    def run(self, cfg):
        from attnzoo.ops.mla import triton_decode as td

        td._launch(self.q, self.qr, self.c, self.kr, None, self.scale, cfg, self.out)

    def check(self, cfg) -> str | None:
        self.out.fill_(float("nan"))
        self.run(cfg)
        err = (self.out[:2].float() - self.ref).abs().max().item()
        bar = 2e-2 * self.ref.abs().max().item()
        return None if err <= bar else f"max error {err:.3g} > {bar:.3g}"

    def free(self):
        for name in ("q", "qr", "c", "kr", "out", "ref"):
            setattr(self, name, None)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--compile-worker":
        _compile_worker(sys.argv[2])
        return 0
    a = parse_args(argv)
    if a.cpu_check:
        _cpu_check_mode()
    elif not torch.cuda.is_available():
        print("mla_decode_sweep: needs a CUDA GPU (or --cpu-check under TRITON_INTERPRET=1)")
        return 2
    import triton

    from attnzoo.ops.mla import triton_decode as td
    from attnzoo.table import format_table

    t0 = time.time()

    def left() -> float:
        return a.budget_s - (time.time() - t0)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    name, arch, sms = td.device_key(torch.device(DEV))
    shapes = [(32, 8192)] if a.quick and DEV == "cuda" else SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    space = kernel_space(a.quick)
    log(f"{name} ({arch}, {sms} SMs), torch {torch.__version__}, triton {triton.__version__}: {len(space)} kernel "
        f"configs, shapes {shapes}, budget {a.budget_s:.0f} s")
    workers = a.workers or max(1, min(12, (os.cpu_count() or 4) - 2))
    failed = precompile(space, workers) if DEV == "cuda" else {}
    space = [k for k in space if _name(k) not in failed]
    log(f"compiled in {workers} processes; {len(failed)} configs do not run here: "
        + ", ".join(f"{n} ({e[:60]})" for n, e in list(failed.items())[:6]))
    ceiling = copy_ceiling(a.rep_ms)
    log(f"copy ceiling: {ceiling['gbps']:.0f} GB/s (do_bench), {ceiling['gbps_graph']:.0f} GB/s (CUDA graph)")

    def timed(shape: Shape, cfg) -> float:
        return _timer(lambda: shape.run(cfg), a.rep_ms)

    results, winners, rows, truncated = [], [], [], False
    for batch, k_len in shapes:
        if left() < 10:
            truncated = True
            log(f"budget spent: B{batch}-S{k_len} and later not measured")
            break
        shape = Shape(batch, k_len)
        done: dict = {}

        def measure(k: dict, splits: int, stage: str):
            cfg = td.DecodeConfig(**k, splits=splits)
            key = (_name(k), splits)
            if key in done:
                return done[key]
            rec = dict(shape=shape.tag, batch=batch, k_len=k_len, config=_name(k), **k, splits=splits, stage=stage)
            try:
                bad = shape.check(cfg)
                if bad:
                    rec["error"] = bad
                else:
                    rec["ms"] = timed(shape, cfg)
            except Exception as e:  # noqa: BLE001 - e.g. out of resources at this shape
                rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if "ms" in rec:
                rec["gbps"] = shape.bytes / rec["ms"] / 1e6
                rec["pct_of_copy"] = 100 * rec["gbps"] / ceiling["gbps"]
                rec["tflops"] = shape.flops / rec["ms"] / 1e9
            done[key] = rec
            results.append(rec)
            return rec

        # the library's own choice first (what runs today without a table entry: tuned or heuristic)
        lib_cfg, lib_source = td.plan(shape.q, shape.c, 1, DR, False)
        lib_k = lib_cfg.kernel_dict()
        lib = measure(lib_k, lib_cfg.splits, f"library ({lib_source})")
        for k in space:  # stage A
            if left() < 5:
                truncated = True
                break
            heur = td.choose_splits(batch, HEADS, 1, k_len, R, DR, 2, k["block_h"], k["block_n"], k["value_split"],
                                    sms)
            measure(k, heur, "A")
        ok = sorted((r for r in done.values() if "ms" in r), key=lambda r: r["ms"])
        top = []
        for r in ok:
            k = {f: r[f] for f in ("value_split", "block_h", "block_n", "num_warps", "num_stages")}
            if k not in top:
                top.append(k)
            if len(top) == a.top:
                break
        for k in top:  # stage B
            for splits in SPLITS:
                if left() < 5:
                    truncated = True
                    break
                measure(k, splits, "B")
        ok = sorted((r for r in done.values() if "ms" in r), key=lambda r: r["ms"])
        finalists = ok[:3] + ([lib] if "ms" in lib and lib not in ok[:3] else [])
        for r in finalists:  # stage C
            if left() < 3:
                truncated = True
                break
            k = {f: r[f] for f in ("value_split", "block_h", "block_n", "num_warps", "num_stages")}
            cfg = td.DecodeConfig(**k, splits=r["splits"])
            r["gpu_ms"] = _graph_timer(lambda cfg=cfg: shape.run(cfg), 20)
            r["gbps_graph"] = shape.bytes / r["gpu_ms"] / 1e6
            r["pct_of_copy_graph"] = 100 * r["gbps_graph"] / ceiling["gbps_graph"]
        timed_c = [r for r in finalists if "gpu_ms" in r] or ok[:1]
        if timed_c:
            best = min(timed_c, key=lambda r: r.get("gpu_ms", r["ms"]))
            winners.append(best)
            for label, r in (("best", best), ("library", lib)):
                row = {"shape": shape.tag, "row": label, "config": r["config"], "splits": r["splits"]}
                if "ms" in r:
                    row.update({"ms": round(r["ms"], 4), "gpu_ms": round(r["gpu_ms"], 4) if "gpu_ms" in r else None,
                                "GB/s": round(r["gbps"]), "% of copy": round(r["pct_of_copy"], 1),
                                "TF/s": round(r["tflops"]), "stage": r["stage"]})
                else:
                    row["stage"] = f"{r['stage']}: {r.get('error')}"
                rows.append(row)
            log(f"{shape.tag}: best {best['config']} splits {best['splits']}: {best['ms']:.4f} ms "
                f"({best['pct_of_copy']:.0f}% of copy, {best['tflops']:.0f} TF/s); library {lib.get('ms', 'n/a')}; "
                f"{len(done)} candidates, {sum('error' in r for r in done.values())} rejected")
        shape.free()
        if DEV == "cuda":
            torch.cuda.empty_cache()

    text = format_table(rows, ["shape", "row", "config", "splits", "ms", "gpu_ms", "GB/s", "% of copy", "TF/s",
                               "stage"], title="MLA split-KV decode sweep: best per shape and the library's choice")
    footer = (f"copy ceiling {ceiling['gbps']:.0f} GB/s (do_bench) / {ceiling['gbps_graph']:.0f} GB/s (graph); "
              f"{len(results)} candidates in {time.time() - t0:.0f} s" + (" (budget cut the sweep)" if truncated
                                                                         else ""))
    print("\n" + text + "\n\n" + footer)
    report = dict(device=name, arch=arch, sms=sms, torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=_commit(), ceiling=ceiling,
                  failed_to_compile=failed, truncated=truncated, winners=winners, results=results)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, "mla_decode_sweep.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        md = os.path.join(a.out, "mla_decode_sweep.md")
        with open(md, "w") as f:
            f.write(f"# MLA split-KV decode sweep ({name})\n\ndevice: {name} ({arch}, {sms} SMs), commit "
                    f"{report['commit']}, {report['date']}, torch {report['torch']}, triton {report['triton']}; "
                    "written by benchmarks/mla_decode_sweep.py\n\n```\n" + text + "\n```\n\n" + footer + "\n")
        print(f"wrote {path}, {md}")
    if a.write_table and winners:
        path = a.table or str(td.TABLE_PATH)
        write_table(path, winners, name, arch, report)
        print(f"wrote {len(winners)} entries into {path}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def write_table(path: str, winners: list[dict], device: str, arch: str, report: dict) -> None:
    """Replace this card's entries for the swept family (group 128, 512 + 64, bf16) by the winners; keep others."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    family = dict(group=HEADS, rope_heads=1, kv_rank=R, rope_dim=DR, dtype="bfloat16")
    kept = [e for e in data.get("entries", [])
            if not (e.get("device") == device and all(e.get(k) == v for k, v in family.items()))]
    for w in winners:
        cfg = {f: w[f] for f in ("block_h", "block_n", "num_warps", "num_stages", "value_split", "splits")}
        kept.append(dict(device=device, arch=arch, **family, batch=w["batch"], k_len=w["k_len"], config=cfg,
                         ms=round(w["ms"], 4), gpu_ms=round(w.get("gpu_ms", float("nan")), 4),
                         gbps=round(w["gbps"]), pct_of_copy=round(w["pct_of_copy"], 1),
                         source=f"benchmarks/mla_decode_sweep.py, commit {report['commit']}, {report['date']}, "
                                f"torch {report['torch']}, triton {report['triton']}"))
    data["entries"] = kept
    data.setdefault("about", "Best split-KV decode configurations per card, shape family and dtype, written by "
                             "benchmarks/mla_decode_sweep.py --write-table (docs/mla.md).")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
