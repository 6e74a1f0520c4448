"""The main job in one command, offline, on the built-in model (a few minutes on 2 CPU cores):

  1. evaluate the built-in MHA model on held-out built-in data,
  2. convert it to GQA with 2 KV heads twice: mean-pooling and the SVD method (--to mla: to MLA at the
     -68.75% KV budget, with the weight-only SVD and the calibrated PCA method),
  3. uptrain with 5% of its pretraining tokens: cross-entropy and distillation from the
     original (same budget), and distillation from the SVD conversion,
  4. evaluate everything and print a table (perplexity, share of the perplexity gap recovered,
     recall perplexity, KV bytes/token) with notes on what it leaves out and why.

Writes demo_results.json (every metric), demo_table.md and demo.png (loss curves and perplexity
bars) into --out (default: ./attnzoo-demo, created if missing). See docs/main-job.md.
"""
from __future__ import annotations

NAME = "demo"
HELP = "convert the built-in model to GQA, uptrain it, and compare (offline, minutes on CPU)"


def add_arguments(p):
    from ..demo.pipeline import DemoOptions as O

    p.add_argument("--out", default=O.out, help="directory for the table, JSON and PNG, created if missing "
                   "(default: %(default)s)")
    p.add_argument("--model", default=O.model, help="MHA model to start from (default: %(default)s)")
    p.add_argument("--to", default=O.to, choices=("gqa", "mla"), help="what the demo converts to: GQA with --groups "
                   "KV heads, or MLA (latent --kv-rank + --rope-dim; default: the -68.75%% KV budget) "
                   "(default: %(default)s)")
    p.add_argument("--groups", type=int, default=O.groups, help="KV heads after conversion (default: %(default)s)")
    p.add_argument("--kv-rank", type=int, default=None, help="--to mla: latent numbers per token and layer")
    p.add_argument("--rope-dim", type=int, default=None, help="--to mla: rope dims per token and layer")
    p.add_argument("--fraction", type=float, default=O.fraction, help="uptraining budget as a fraction of the "
                   "pretraining tokens (default: %(default)s)")
    p.add_argument("--lr", type=float, default=O.lr, help="uptraining peak learning rate (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=O.alpha, help="distillation weight (default: %(default)s)")
    p.add_argument("--eval-seqs", type=int, default=O.eval_seqs, help="held-out sequences scored per model "
                   "(default: %(default)s)")
    p.add_argument("--keep-models", action="store_true", help="keep the converted/uptrained models in "
                   "OUT/demo_models")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    import os

    from ..demo.pipeline import DemoOptions, run_demo
    from ..demo.report import text_table
    from ..errors import check_positive_int

    check_positive_int("--groups", args.groups)
    check_positive_int("--eval-seqs", args.eval_seqs)
    if not args.fraction > 0:
        raise ValueError(f"--fraction={args.fraction}: expected a positive fraction of the pretraining tokens")
    summary = run_demo(DemoOptions(out=args.out, model=args.model, groups=args.groups, to=args.to,
                                   kv_rank=args.kv_rank, rope_dim=args.rope_dim, fraction=args.fraction,
                                   lr=args.lr, alpha=args.alpha, eval_seqs=args.eval_seqs,
                                   keep_models=args.keep_models, progress=not args.quiet))
    target = f"GQA-{args.groups}" if args.to == "gqa" else summary["target"].upper()
    print(text_table(summary["results"], title=f"attnzoo demo: MHA -> {target}, uptrained on "
                                               f"{100 * args.fraction:g}% of the pretraining tokens"))
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in ('demo_table.md', 'demo_results.json', 'demo.png'))}"
          f" in {summary['seconds']:.0f} s")
    return 0
