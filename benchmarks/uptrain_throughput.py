"""Uptraining throughput and memory: tokens/s, MFU and peak memory of `attnzoo uptrain` with distillation.

Builds a student and a frozen teacher with SmolLM2-135M's shape (Llama: hidden 576, 30 layers, 9 query heads
over 3 KV heads, intermediate 1536, vocabulary 49,152, tied embeddings; random weights: throughput does not
depend on them) and a token file of random ids, then runs the real command, ``python -m attnzoo uptrain``
(or ``accelerate launch ... -m attnzoo uptrain`` with ``--launch``), as a child process and reports:

* tokens/s over the timed steps (after ``--warmup-steps``, which absorb compilation), from the run's own
  ``loss_log.jsonl`` clock, per process and in all;
* MFU: model FLOPs per token x tokens/s / the device's peak (dense bf16: 989 TFLOP/s on H100 SXM and H200;
  ``--peak-tflops`` for others). FLOPs per token, PaLM's count: student ``6 N + 12 L H T`` (training),
  teacher ``2 N + 4 L H T`` (forward only), ``N`` the non-embedding parameters plus the output head's, ``L``
  layers, ``H`` hidden size, ``T`` sequence length (causal masking not discounted);
* the child's peak RSS (host memory) and, on CUDA, its peak allocated GPU memory.

Goals (issue 22): >= 150k tokens/s on one H100 in bf16 with distillation; peak RSS <= 4 GB on the CPU path.

    # one GPU (the goal):
    python benchmarks/uptrain_throughput.py --json benchmarks/results/uptrain_throughput-h100.json
    # the CPU path's memory (a short run, small batch):
    python benchmarks/uptrain_throughput.py --cpu --batch-size 8 --seq-len 256 --warmup-steps 1 --steps 2 \\
        --mixed-precision no --no-compile
    # 2 GPUs (issue 23): --launch "accelerate launch --config_file examples/accelerate_fsdp.yaml"
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu")
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}


def build_models(work: Path) -> tuple[Path, Path]:
    """Student and teacher directories (random weights, different seeds), built once per work dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = []
    for name, seed in (("student", 0), ("teacher", 1)):
        d = work / name
        if not (d / "config.json").is_file():
            torch.manual_seed(seed)
            LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(str(d))
        dirs.append(d)
    return dirs[0], dirs[1]


def build_tokens(work: Path, count: int, vocab: int) -> Path:
    """A token file of ``count`` random ids (uniform over the vocabulary, seeded)."""
    import numpy as np

    from attnzoo.data.token_file import TokenFileWriter, open_token_file

    path = work / f"random-{count}.tokens"
    try:
        if open_token_file(path).meta["count"] >= count:
            return path
    except (FileNotFoundError, ValueError):
        pass
    rng = np.random.default_rng(0)
    with TokenFileWriter(path, vocab_size=vocab, eos_id=None, tokenizer="random ids") as w:
        for start in range(0, count, 1 << 22):
            w.add(rng.integers(0, vocab, size=min(1 << 22, count - start)), "random")
    return path


def flops_per_token(seq_len: int, teacher: bool) -> float:
    c = SMOLLM2_135M
    h, n_layers, inter, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    n = n_layers * per_layer + v * h  # + the output head's matmul (tied to the embedding)
    attn = n_layers * h * seq_len
    return 6 * n + 12 * attn + ((2 * n + 4 * attn) if teacher else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="where models, data and the run go (default: a temporary directory, removed)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per process per micro-batch")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps not timed (compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16"))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-teacher", dest="teacher", action="store_false")
    p.add_argument("--loss-chunk", type=int, default=None, help="uptrain's --loss-chunk (default: its default)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--teacher-placement", default="replicate", choices=("replicate", "shard"))
    p.add_argument("--cpu", action="store_true", help="run on the CPU (for the memory measurement)")
    p.add_argument("--launch", default="", help="launcher prefix, e.g. 'accelerate launch --config_file "
                   "examples/accelerate_fsdp.yaml' (default: one plain process)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by device name)")
    p.add_argument("--json", help="also write the result as JSON here")
    args = p.parse_args(argv)

    import torch

    from attnzoo.bench.record import device_tag, environment
    from attnzoo.table import format_table

    own_tmp = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="attnzoo-uptrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    launch = shlex.split(args.launch)
    procs = 1
    if launch:
        procs = int(launch[launch.index("--num_processes") + 1]) if "--num_processes" in launch else \
            (torch.cuda.device_count() or 2)
    steps = args.warmup_steps + args.steps
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * procs
    student, teacher = build_models(work)
    data = build_tokens(work, steps * tokens_per_step + args.seq_len, SMOLLM2_135M["vocab_size"])
    out = work / "run"
    cmd = (launch or [sys.executable]) + ["-m", "attnzoo", "uptrain", "--model", str(student), "--out", str(out),
                                          "--data", str(data), "--tokens", str(steps * tokens_per_step),
                                          "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                                          "--grad-accum", str(args.grad_accum), "--warmup", "0.1", "--lr", "3e-4",
                                          "--mixed-precision", args.mixed_precision, "--no-progress", "--force"]
    if args.teacher:
        cmd += ["--teacher", str(teacher), "--teacher-placement", args.teacher_placement]
    if args.compile:
        cmd.append("--compile")
    if args.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    if args.loss_chunk is not None:
        cmd += ["--loss-chunk", str(args.loss_chunk)]
    if args.cpu:
        cmd.append("--cpu")
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        print(f"uptrain failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux

    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    timed = [e for e in log if e["step"] > args.warmup_steps]
    t0 = next(e["seconds"] for e in log if e["step"] == args.warmup_steps) if args.warmup_steps else 0.0
    seconds = timed[-1]["seconds"] - t0
    tps = len(timed) * tokens_per_step / seconds
    gpu = torch.cuda.is_available() and not args.cpu
    tag = device_tag() if gpu else "cpu"
    peak = args.peak_tflops or PEAK_TFLOPS.get(tag)
    fpt = flops_per_token(args.seq_len, args.teacher)
    mfu = tps / procs * fpt / (peak * 1e12) if peak else None
    result = {"env": environment(), "processes": procs, "launch": args.launch or "one process",
              "options": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
              "tokens_per_step": tokens_per_step, "timed_steps": len(timed), "seconds": round(seconds, 3),
              "tokens_per_s": round(tps), "tokens_per_s_per_process": round(tps / procs),
              "flops_per_token": fpt, "mfu": round(mfu, 4) if mfu is not None else None,
              "peak_rss_gb": round(rss_gb, 3), "peak_gpu_mem_gb": max((e.get("max_mem_gb", 0) for e in log), default=0)
              or None, "final_loss": log[-1]["loss"]}
    rows = [("device", result["env"]["device"]), ("processes", procs), ("commit", result["env"]["commit"]),
            ("date", result["env"]["date"]), ("tokens/step", f"{tokens_per_step:,}"),
            ("timed steps", f"{len(timed)} ({seconds:.1f} s)"), ("tokens/s", f"{tps:,.0f}"),
            ("tokens/s per process", f"{tps / procs:,.0f}"),
            ("MFU", f"{100 * mfu:.1f}% of {peak:g} TFLOP/s" if mfu is not None else "- (no --peak-tflops)"),
            ("peak RSS (child)", f"{rss_gb:.2f} GB"),
            ("peak GPU memory (per process)", f"{result['peak_gpu_mem_gb']} GB" if result["peak_gpu_mem_gb"] else "-")]
    print(format_table([{"": k, "value": str(v)} for k, v in rows], title="uptrain throughput (SmolLM2-135M shape"
                       + (", distillation)" if args.teacher else ")")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if own_tmp:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
