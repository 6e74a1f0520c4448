"""Report of the 2-GPU uptraining runs (issue 23) made by ``bash benchmarks/uptrain_gpu_runs.sh scaling``.

Reads ``WORK/scale-{1gpu,ddp,fsdp,fsdp-resumed}/loss_log.jsonl`` and writes ``OUT.md``, ``OUT.json`` and
``OUT.png`` (loss curves overlaid): tokens/s in all and per GPU over the steps after ``--skip`` (compilation),
scaling efficiency (per-GPU tokens/s on 2 GPUs / tokens/s on 1), the largest loss difference to the 1-GPU curve
and between the resumed and the uninterrupted FSDP run, and the held-out perplexity of each final model.

    python benchmarks/uptrain_scaling_report.py --work WORK --out benchmarks/results/uptrain-scaling-h100
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {"1 GPU": ("scale-1gpu", 1), "DDP, 2 GPUs": ("scale-ddp", 2), "FSDP, 2 GPUs": ("scale-fsdp", 2),
        "FSDP, 2 GPUs, stopped + resumed": ("scale-fsdp-resumed", 2)}


def _tokens_per_s(log: list[dict], skip: int) -> float:
    """Tokens/s between the end of step ``skip`` and the last step, on the run's own clock (which leaves out
    the time between a stop and its resume)."""
    ref, last = next(e for e in log if e["step"] == skip), log[-1]
    return (last["tokens"] - ref["tokens"]) / (last["seconds"] - ref["seconds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="path stem of the .md/.json/.png written")
    p.add_argument("--skip", type=int, default=5, help="first steps not timed (compilation)")
    p.add_argument("--eval-seq", type=int, default=512)
    args = p.parse_args(argv)

    from attnzoo.bench.record import environment
    from attnzoo.table import markdown_table
    from attnzoo.uptrain.curves import plot_losses, read_log

    work = Path(args.work)
    logs = {name: read_log(work / d / "loss_log.jsonl") for name, (d, _) in RUNS.items()}
    base = logs["1 GPU"]
    tps1 = _tokens_per_s(base, args.skip)
    rows, out = [], {"env": environment(), "runs": {}}
    for name, (d, gpus) in RUNS.items():
        log = logs[name]
        tps = _tokens_per_s(log, args.skip)
        ref = logs["FSDP, 2 GPUs"] if "resumed" in name else base
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(log, ref))
        js = work / f"eval-{d}.json"
        subprocess.run([sys.executable, "-m", "attnzoo", "eval", "--model", str(work / d), "--data",
                        str(work / "eval.safetensors"), "--num-seqs", "0", "--seq-len", str(args.eval_seq),
                        "--decode-tokens", "0", "--json", str(js)], check=True, cwd=REPO, capture_output=True)
        ppl = json.loads(js.read_text())["perplexity"]
        r = {"tokens/s": round(tps), "tokens/s per GPU": round(tps / gpus),
             "scaling efficiency": round(tps / gpus / tps1, 3) if gpus > 1 else None,
             "max |loss - reference|": diff, "reference": "FSDP, 2 GPUs" if "resumed" in name else "1 GPU",
             "perplexity": ppl, "steps": len(log), "tokens": log[-1]["tokens"]}
        out["runs"][name] = r
        rows.append({"run": name, **{k: ("-" if v is None else v) for k, v in r.items()}})
    env = out["env"]
    lines = ["# Uptraining on 2 GPUs: SmolLM2-135M (MQA) with distillation", "",
             f"{env['device']}, commit {env['commit']}, {env['date']}, torch {env['torch']}", "",
             markdown_table(rows), "",
             f"tokens/s from the runs' loss logs after step {args.skip}; perplexity on the held-out text "
             f"({args.eval_seq}-token windows). Loss curves: {Path(args.out).name}.png"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    plot_losses(logs, args.out + ".png", key="loss", title="uptraining loss: 1 GPU, DDP, FSDP, resumed")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
