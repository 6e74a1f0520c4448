"""Quality of the linear family on the built-in model: plain swap, attention transfer only, transfer + LoRA.

Converts attnzoo's built-in model (a 4-layer Llama, 1.5M pretraining tokens) to ``linear`` attention with learned
feature maps (``hedgehog``; ``performer``, FAVOR+ with a learned projection), with and without a 64-token
softmax window, and for reference to ``performer`` (random FAVOR+ features, nothing to transfer). For each:
held-out perplexity (``builtin:1``) of the plain swap, after ``attnzoo uptrain --stage transfer`` (only the
feature maps train), and after a LoRA stage on top (rank 8; the feature maps train fully), with budgets in tokens
of the uptraining data (``builtin:0``); the total stays within ``--budget`` of the pretraining tokens.

    python benchmarks/linear_quality.py [--budget 0.01] [--out benchmarks/results/linear-quality-cpu.md]

CPU only, seeds fixed.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnzoo  # noqa: E402
from attnzoo.checkpoint_io import load_causal_lm, read_metadata, resolve_model_dir  # noqa: E402
from attnzoo.data.sources import open_data  # noqa: E402
from attnzoo.data.tokenizer import load_tokenizer  # noqa: E402
from attnzoo.evaluate.metrics import score  # noqa: E402
from attnzoo.table import format_table, markdown_table  # noqa: E402
from attnzoo.uptrain import UptrainOptions, uptrain  # noqa: E402

CONFIGS = [
    ("performer (random FAVOR+, m=64)", "performer", {"features": 64}),
    ("hedgehog", "linear", {"feature_map": "hedgehog"}),
    ("hedgehog + window 64", "linear", {"feature_map": "hedgehog", "window": 64}),
    ("performer map (learned, m=64)", "linear", {"feature_map": "performer", "features": 64}),
    ("performer map (learned, m=64) + window 64", "linear", {"feature_map": "performer", "features": 64, "window": 64}),
]
BATCH, SEQ = 4, 256


def ppl(model, data, nseq: int) -> float:
    model.eval()
    return score(model, data, nseq, batch_size=16).perplexity


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.01, help="fraction of the pretraining tokens for both stages")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--transfer-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--out", default="benchmarks/results/linear-quality-cpu.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = resolve_model_dir("builtin", "--model")
    tok = load_tokenizer(src)
    base = load_causal_lm(src, dtype=torch.float32)
    pre = int(read_metadata(base)["pretraining_tokens"])
    data = open_data("builtin:1", SEQ, tokenizer=tok, vocab_size=base.config.vocab_size)
    per_step = BATCH * SEQ
    steps = max(1, int(args.budget * pre) // (2 * per_step))
    stage_tokens = steps * per_step
    original = ppl(base, data, args.num_seqs)
    print(f"original perplexity {original:.2f}; {steps} steps ({stage_tokens:,} tokens) per stage", flush=True)
    rows, t0 = [], time.time()
    common = dict(batch_size=BATCH, seq_len=SEQ, progress=False, cpu=True, force=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, variant, opts in CONFIGS:
            model = load_causal_lm(src, dtype=torch.float32)
            attnzoo.patch(model, variant, **opts)
            conv = tmp / "conv"
            model.save_pretrained(str(conv))
            tok.save_pretrained(str(conv))
            swap = ppl(model, data, args.num_seqs)
            row = {"conversion": label, "plain swap": round(swap, 2)}
            start = conv
            if variant == "linear":
                uptrain(UptrainOptions(model=str(conv), out=str(tmp / "tr"), tokens=stage_tokens, stage="transfer",
                                       lr=args.transfer_lr, **common))
                row["transfer only"] = round(ppl(load_causal_lm(tmp / "tr"), data, args.num_seqs), 2)
                start = tmp / "tr"
            else:
                row["transfer only"] = "-"
            uptrain(UptrainOptions(model=str(start), out=str(tmp / "lora"), tokens=stage_tokens, lora_rank=8,
                                   lr=args.lora_lr, **common))
            final = ppl(load_causal_lm(tmp / "lora"), data, args.num_seqs)
            row["+ LoRA" if variant == "linear" else "LoRA only"] = round(final, 2)
            row["gap recovered"] = f"{100 * (swap - final) / (swap - original):.0f}%" if swap > original else "-"
            rows.append(row)
            print(format_table([row]), flush=True)
    keys = ["conversion", "plain swap", "transfer only", "+ LoRA", "LoRA only", "gap recovered"]
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# The linear family on the built-in model: plain swap, attention transfer, transfer + LoRA", "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, CPU only, 2 threads (shared with other jobs), "
        f"torch {torch.__version__}. attnzoo commit {commit}, {datetime.date.today()}; "
        f"{time.time() - t0:.0f} s in all.", "",
        f"Model: attnzoo's built-in Llama (4 layers, hidden 192, 4 heads of 48), {pre:,} pretraining tokens. "
        f"Held-out perplexity on `builtin:1`, {args.num_seqs} sequences of {SEQ} tokens; original (softmax): "
        f"**{original:.2f}**.", "",
        f"Budget: {args.budget:.0%} of the pretraining tokens in all: {steps} steps of {BATCH} x {SEQ} tokens "
        f"({stage_tokens:,} tokens) for `attnzoo uptrain --stage transfer` (only the feature maps train, lr "
        f"{args.transfer_lr}) and as many for the LoRA stage (rank 8 on q/k/v/o and the MLP, the feature maps "
        f"trained fully, lr {args.lora_lr}) on `builtin:0`. 'gap recovered' = (swap - final) / (swap - original). "
        "Random FAVOR+ (`performer`) has nothing to transfer: its row is swap + LoRA.", "",
        markdown_table(rows), "",
        f"Reproduce: `python benchmarks/linear_quality.py --budget {args.budget}`.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
