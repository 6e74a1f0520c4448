"""Quality of the reformer conversion on the built-in model, before and after a short uptraining, against the
sliding-window conversion with the same number of keys per query.

The built-in model (Llama, 4 layers, hidden 192, 4 heads of 48, trained on the built-in corpus) is converted with
``patch(model, "reformer", num_hashes=R, bucket_size=C)`` and with ``patch(model, "sliding_window", window=R*C)``:
a causal LSH round reads 2 chunks of C sorted tokens of which about half precede the query, so R rounds read about
R*C earlier keys (the window's count). Each is scored (perplexity, recall-answer accuracy; ``attnzoo.evaluate``; also
with one of the R rounds a ``local_round``)
on held-out built-in sequences (seed 1) of 256 tokens, then uptrained for ``--steps`` steps (AdamW, batch 8, same
data stream for every model, seed 0 sequences) and scored again.

    python benchmarks/reformer_quality.py [--steps 60] [--out benchmarks/results/reformer_quality.md]

Runs on the CPU (the LSH torch backend; the Triton kernels compute the same on a GPU); seeds fixed.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnzoo  # noqa: E402
from attnzoo.data.corpus import BuiltinCorpus  # noqa: E402
from attnzoo.data.model import builtin_model_dir  # noqa: E402
from attnzoo.data.sources import open_data  # noqa: E402
from attnzoo.evaluate.metrics import score  # noqa: E402
from attnzoo.table import format_table, markdown_table  # noqa: E402


def uptrain(model, steps: int, lr: float, bs: int = 8, log=print) -> float:
    corpus = BuiltinCorpus(seed=0, seq_len=256)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        x = corpus.batch(range(100_000 + step * bs, 100_000 + (step + 1) * bs))  # past the pre-training samples
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 20 == 0:
            log(f"  step {step + 1}  loss {loss.item():.3f}  {time.time() - t0:.0f}s")
    model.eval()
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval", type=int, default=64, help="held-out sequences scored")
    ap.add_argument("--num-hashes", type=int, default=2)
    ap.add_argument("--bucket-size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/reformer_quality.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(builtin_model_dir()).eval()
    data = open_data("builtin:1", 256)
    r, c = args.num_hashes, args.bucket_size
    window = r * c
    variants = {
        "dense (the built-in model)": None,
        f"reformer num_hashes={r} bucket_size={c}": ("reformer", dict(num_hashes=r, bucket_size=c)),
        f"reformer num_hashes={r - 1} + local_round, bucket_size={c}": (
            "reformer", dict(num_hashes=r - 1, bucket_size=c, local_round=True)),
        f"sliding_window window={window}": ("sliding_window", dict(window=window)),
    }
    rows = []
    for label, spec in variants.items():
        model = copy.deepcopy(base)
        if spec is not None:
            attnzoo.patch(model, spec[0], **spec[1])
        t = time.time()
        before = score(model, data, args.eval)
        print(f"{label}: ppl {before.perplexity:.3f} recall acc {before.recall_accuracy:.3f} "
              f"({time.time() - t:.0f}s)", flush=True)
        row = {"model": label, "ppl": round(before.perplexity, 3), "recall acc": round(before.recall_accuracy, 3),
               "ppl after uptrain": "-", "recall acc after": "-", "uptrain s": "-"}
        if spec is not None:
            secs = uptrain(model, args.steps, args.lr)
            after = score(model, data, args.eval)
            row.update({"ppl after uptrain": round(after.perplexity, 3),
                        "recall acc after": round(after.recall_accuracy, 3), "uptrain s": round(secs)})
            print(f"  after {args.steps} steps: ppl {after.perplexity:.3f} recall acc {after.recall_accuracy:.3f}",
                  flush=True)
        rows.append(row)
    print(format_table(rows))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# reformer conversion of the built-in model: perplexity before and after a short uptraining",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads (shared with other jobs), torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}. attnzoo commit {commit}, {date}.",
        "",
        f"Built-in model (Llama, 4 layers, hidden 192, 4 heads of 48), sequences of 256 tokens; {args.eval} held-out "
        f"sequences (builtin:1). Uptraining: {args.steps} steps of AdamW lr {args.lr}, batch 8 x 256 tokens, the same "
        f"stream for every conversion. Keys per query: reformer reads {r} rounds x 2 chunks of {c} sorted tokens, "
        f"about {r} x {c} = {window} earlier keys (causal; with local_round one of the rounds is the chunks of "
        f"consecutive positions); the sliding window reads {window} + 1.",
        "",
        markdown_table(rows),
        "",
        f"Command: `python benchmarks/reformer_quality.py --steps {args.steps} --num-hashes {r} --bucket-size {c}`",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
