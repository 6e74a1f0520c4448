"""How fast is `attnzoo convert` on a 7B checkpoint, next to copying it?

Writes a synthetic checkpoint with Llama-2-7B shapes (32 layers, hidden 4096, 32 heads,
vocab 32000; bf16, random weights, ~13 GB in ~5 GB shards with a
model.safetensors.index.json, as on the Hub), then measures with ``/usr/bin/time -v``:

1. ``cp -r SRC COPY && sync``
2. ``python -m attnzoo convert SRC DST --to gqa --groups 8 && sync``

each from a cold page cache (``echo 3 > /proc/sys/vm/drop_caches`` when allowed), and
reports wall time and the child's peak RSS. The target: convert <= 1.5x the copy, peak RSS
<= 2.5 GB. It spot-checks the output (a pooled k_proj equals the mean of its source heads),
writes a markdown table and deletes everything it wrote unless ``--keep``.

    python benchmarks/convert_speed.py [--workdir /tmp/attnzoo-bench] [--out benchmarks/results/convert_speed.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from attnzoo.conversion.safetensors_io import ShardWriter, nbytes, read_header  # noqa: E402
from attnzoo.table import format_table, markdown_table  # noqa: E402

L, D, FF, H, V = 32, 4096, 11008, 32, 32000
SHARD = 5 * 10**9


def tensors():
    yield "model.embed_tokens.weight", (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (D, D)
        yield p + "mlp.gate_proj.weight", (FF, D)
        yield p + "mlp.up_proj.weight", (FF, D)
        yield p + "mlp.down_proj.weight", (D, FF)
        yield p + "input_layernorm.weight", (D,)
        yield p + "post_attention_layernorm.weight", (D,)
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (V, D)


def make_checkpoint(src: Path) -> int:
    src.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for name, shape in tensors():
        b = nbytes(torch.bfloat16, shape)
        if cur and size + b > SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    shards.append(cur)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(src / fname, [(n, torch.bfloat16, s) for n, s in shard], {"format": "pt"})
        for n, s in shard:
            t = torch.empty(s, dtype=torch.float32).normal_(0, 0.02, generator=g).to(torch.bfloat16)
            w.write(n, t)
            weight_map[n] = fname
            total += t.numel() * 2
        w.close()
        print(f"  wrote {fname}", flush=True)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
              "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": H,
              "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
              "eos_token_id": 2}
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (src / "tokenizer_config.json").write_text("{}")
    return total


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``sh -c cmd`` (the largest child, per /usr/bin/time)."""
    res = subprocess.run(["/usr/bin/time", "-v", "sh", "-c", cmd], capture_output=True, text=True, cwd=REPO,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1)) * 1024
    return seconds, rss


def spot_check(src: Path, dst: Path) -> str:
    from safetensors import safe_open

    idx_s = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    idx_d = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.17.self_attn.k_proj.weight"
    with safe_open(src / idx_s[name], "pt") as f:
        k = f.get_tensor(name)
    with safe_open(dst / idx_d[name], "pt") as f:
        k2 = f.get_tensor(name)
    want = k.float().reshape(8, 4, 128, D).mean(1).reshape(8 * 128, D).to(torch.bfloat16)
    assert torch.equal(k2, want), "pooled k_proj differs from the mean of its heads"
    headers = [read_header(p)[0] for p in sorted(dst.glob("*.safetensors"))]
    assert sum(len(h) for h in headers) == len(idx_d) == len(idx_s)
    return f"{name}: {tuple(k.shape)} -> {tuple(k2.shape)}, equals the mean of each 4 source heads"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/attnzoo-bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_speed.md"))
    ap.add_argument("--repeats", type=int, default=4, help="pairs of runs (the order alternates)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint (for --reuse)")
    ap.add_argument("--reuse", action="store_true", help="reuse a synthetic checkpoint left by --keep")
    args = ap.parse_args()
    work = Path(args.workdir)
    src, copy, dst = work / "llama-2-7b-synthetic", work / "copy", work / "gqa8"
    reuse = args.reuse and (src / "model.safetensors.index.json").exists()
    if work.exists() and not reuse:
        shutil.rmtree(work)
    for d in (copy, dst):
        shutil.rmtree(d, ignore_errors=True)
    cp_op, cv_op = "cp -r SRC COPY", "attnzoo convert SRC DST --to gqa --groups 8"
    convert = f"{sys.executable} -m attnzoo convert '{src}' '{dst}' --to gqa --groups 8 --no-progress --force"
    commands = {cp_op: f"cp -r '{src}' '{copy}' && sync", cv_op: convert + " > /dev/null && sync"}
    try:
        t0 = time.time()
        if reuse:
            total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            print("writing the synthetic checkpoint...", flush=True)
            total = make_checkpoint(src)
            print(f"  {total / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
        results: dict[str, list] = {cp_op: [], cv_op: []}
        cold = True
        subprocess.run([sys.executable, "-c", "import attnzoo.cli"], cwd=REPO, check=True)  # compile .pyc once
        for r in range(args.repeats):
            for op in ((cp_op, cv_op) if r % 2 == 0 else (cv_op, cp_op)):
                shutil.rmtree(copy, ignore_errors=True)
                cold &= drop_caches()
                results[op].append(timed(commands[op]))
                print(f"  {op}: {results[op][-1][0]:.1f} s, {results[op][-1][1] / 2**20:.0f} MiB", flush=True)
        check = spot_check(src, dst)
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for d in (copy, dst):
                shutil.rmtree(d, ignore_errors=True)
    ratios = [c[0] / p[0] for c, p in zip(results[cv_op], results[cp_op])]
    rows = []
    for op, runs in results.items():
        times = sorted(s for s, _ in runs)
        rows.append({"operation": op, "wall s (median)": round(statistics.median(times), 1),
                     "wall s (runs, in order)": ", ".join(f"{s:.1f}" for s, _ in runs),
                     "peak RSS": f"{max(m for _, m in runs) / 2**20:.0f} MiB",
                     "x cp (median of pairs)": round(statistics.median(ratios), 2) if op == cv_op else 1})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    lines = [
        "# `attnzoo convert` on a 7B checkpoint vs `cp -r`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"ext4 on a virtual disk; Python {platform.python_version()}, torch {torch.__version__}. "
        f"attnzoo commit {commit}, {datetime.date.today().isoformat()}.",
        "",
        f"Source: synthetic Llama-2-7B shapes (32 layers, hidden 4096, 32 heads, vocab 32000), bf16 random weights, "
        f"{total / 1e9:.2f} GB in 3 shards of <= 5 GB with an index; {args.repeats} pairs of runs, the order "
        "alternating within each pair. Output: GQA-8 (`--method mean`), "
        f"{out_bytes / 1e9:.2f} GB. Each run starts from a {'cold' if cold else 'warm (could not drop caches)'} "
        "page cache and includes `sync`; the convert runs include Python start-up and imports. Peak RSS is the "
        "largest process's, from `/usr/bin/time -v`. The virtual disk's throughput drifts a lot over minutes "
        "(the same copy took 20-42 s while tuning), hence pairs and medians.",
        "",
        markdown_table(rows),
        "",
        "Pair ratios (convert / cp): " + ", ".join(f"{x:.2f}" for x in ratios) + ".",
        "",
        f"Spot check: {check}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(format_table(rows))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
