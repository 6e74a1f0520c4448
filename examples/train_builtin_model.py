"""Train (or just initialise) a Llama model on the built-in corpus; builds attnzoo's packaged model.

The packaged model in attnzoo/data/builtin_model/ was built by (2 CPU cores):

    python examples/train_builtin_model.py --out attnzoo/data/builtin_model --tokens 1500000 --force

which initialises the "builtin" preset with --seed, pretrains it through attnzoo's uptrain loop
(stage "pretrain", so config.json records attnzoo.pretraining_tokens), evaluates it on
builtin:1 and writes README.md (command, seed, loss, metrics) beside the weights.

For a larger model on GPUs, initialise here and pretrain under accelerate
(see examples/multi_gpu_uptrain.sh):

    python examples/train_builtin_model.py --preset 100m --init-only --out runs/init
    accelerate launch -m attnzoo uptrain --stage pretrain --model runs/init --out runs/base --tokens ...
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULTS = dict(tokens=1_500_000, lr=2e-3, batch_size=16, seq_len=256, seed=0, warmup=0.02, min_lr_ratio=0.1)


def init_dir(preset: str, seed: int, out: Path) -> None:
    from attnzoo.checkpoint_io import quiet_hf
    from attnzoo.data import builtin_tokenizer, init_model

    model = init_model(preset, seed=seed)
    with quiet_hf():
        model.save_pretrained(str(out))
    builtin_tokenizer().save_pretrained(str(out))


def model_card(args, result, metrics: dict) -> str:
    cmd = "python examples/train_builtin_model.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"""# attnzoo built-in model

A small Llama (multi-head attention) trained on attnzoo's built-in corpus
(`attnzoo.data.corpus`, seed 0 for training, seed 1 held out for evaluation).
Built offline on CPU by `examples/train_builtin_model.py`; nothing was downloaded.

- command: `{cmd}`
- preset: `{args.preset}`, seed {args.seed}, {result.tokens:,} pretraining tokens
  ({result.steps} steps of {args.batch_size} x {args.seq_len} tokens), peak lr {args.lr}, warmup+cosine
- final training loss (mean of the last 10 steps): {result.final_loss:.4f}
- wall time: {result.seconds:.0f} s
- held-out metrics (`attnzoo eval --model builtin --data builtin:1`):

```
{json.dumps(metrics, indent=1)}
```

Loadable with plain `transformers.AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--preset", default="builtin", help="model size preset: tiny, builtin, 100m")
    p.add_argument("--init-only", action="store_true", help="write the initialised model and stop")
    p.add_argument("--force", action="store_true", help="replace --out")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=f"default: {v}")
    args = p.parse_args(argv)

    from attnzoo.checkpoint_io import check_new_output

    out = check_new_output(args.out, args.force)
    if args.init_only:
        from attnzoo.checkpoint_io import atomic_output_dir

        with atomic_output_dir(out, force=args.force) as tmp:
            init_dir(args.preset, args.seed, tmp)
        print(f"initialised {args.preset} model in {out}")
        return 0

    from attnzoo.uptrain import UptrainOptions, uptrain

    with tempfile.TemporaryDirectory() as tmp:
        init_dir(args.preset, args.seed, Path(tmp) / "init")
        result = uptrain(UptrainOptions(model=str(Path(tmp) / "init"), out=str(out), data="builtin:0",
                                        tokens=args.tokens, lr=args.lr, batch_size=args.batch_size,
                                        seq_len=args.seq_len, seed=args.seed, warmup=args.warmup,
                                        min_lr_ratio=args.min_lr_ratio, stage="pretrain", force=args.force))
    metrics = {}
    try:
        from attnzoo.evaluate import evaluate_dir

        metrics = evaluate_dir(str(out), "builtin:1").as_dict()
    except ImportError:  # evaluation not available in this build
        pass
    (out / "README.md").write_text(model_card(args, result, metrics))
    print(f"wrote {out} (final loss {result.final_loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
