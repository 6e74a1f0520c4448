"""Convert a local checkpoint's attention: MHA -> GQA/MQA (or back to MHA), or to a sparse pattern
(sliding window, Longformer, BigBird).

Native architectures (llama family, phi3: ``num_key_value_heads``) are converted by
streaming safetensors shard by shard, without building the model; the result is a plain
``transformers`` checkpoint. Others (gpt2, gpt_neox, bert, roberta, vit, clip) are patched in
memory and saved with the patch recorded in config.json (reload with
``attnzoo.from_pretrained``). DST is written through a temporary directory and renamed at
the end; SRC is never modified.

Sparse patterns: --to sliding_window (decoders; native on mistral, phi3, qwen2, qwen3, gemma2,
where only config.json changes and the shards are streamed), --to longformer and --to bigbird
(encoders: bert, roberta; --max-positions extends the learned position table by copying it,
the Longformer recipe). These are patched in memory and saved with the patch recorded in
config.json (reload with attnzoo.from_pretrained). --window counts keys on each side of a query,
its own position not counted (transformers' sliding_window is window + 1).

examples:
  attnzoo convert ./llama-2-7b ./llama-2-7b-gqa8 --to gqa --groups 8
  attnzoo convert ./llama-2-7b ./llama-2-7b-mqa --to mqa --method svd --dry-run
  attnzoo convert ./mistral-7b ./mistral-w1024 --to sliding_window --window 1024
  attnzoo convert ./roberta-base ./roberta-long --to longformer --window 256 --global-tokens 1 --max-positions 4096
  attnzoo convert ./bert-base ./bert-bigbird --to bigbird --block-size 64 --random-blocks 3 --max-positions 4096
"""
from __future__ import annotations

NAME = "convert"
HELP = "convert a checkpoint's attention (MHA -> GQA/MQA, sliding window, Longformer, BigBird)"


def add_arguments(p):
    from ..conversion.methods import METHODS

    p.add_argument("src", metavar="SRC", help="source checkpoint directory (read only)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--to", required=True, metavar="VARIANT",
                   help="gqa, mqa, mha, sliding_window, longformer or bigbird")
    p.add_argument("--groups", type=int, default=None, help="KV heads to keep (gqa)")
    p.add_argument("--method", default=None,
                   help="initialisation of the merged heads (gqa/mqa, default mean): "
                        + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    s = p.add_argument_group("sparse patterns (--to sliding_window, longformer, bigbird)")
    s.add_argument("--window", type=int, default=None,
                   help="keys on each side of a query, its own not counted (causal: i-window .. i)")
    s.add_argument("--global-tokens", type=_global_tokens, default=None, metavar="N|P,P,...",
                   help="longformer: the first N tokens are global (default 1), or a comma list of positions")
    s.add_argument("--global-projections", action="store_true",
                   help="longformer: separate q/k/v projections for global tokens, initialised as copies")
    s.add_argument("--max-positions", type=int, default=None,
                   help="longformer/bigbird: extend the learned position table to this many tokens by copying")
    s.add_argument("--block-size", type=int, default=None, help="bigbird: tokens per block (default 64)")
    s.add_argument("--global-blocks", type=int, default=None, help="bigbird: global blocks (default 2)")
    s.add_argument("--random-blocks", type=int, default=None, help="bigbird: random key blocks per query block "
                                                                  "(default 3)")
    s.add_argument("--seed", type=int, default=None, help="bigbird: seed of the random blocks (default 0)")
    p.add_argument("--dtype", default="auto", help="output dtype: auto (as stored), float32, float16, bfloat16")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the savings; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _global_tokens(text: str):
    """``--global-tokens 1`` (the first token) or ``--global-tokens 0,511`` (positions)."""
    try:
        return int(text) if "," not in text else [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--global-tokens {text!r}: expected a count (e.g. 1) or comma-separated positions "
                         "(e.g. 0,511)") from None


OPTIONS = ("groups", "method", "window", "global_tokens", "global_projections", "max_positions", "block_size",
           "global_blocks", "random_blocks", "seed")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args) -> int:
    from ..conversion.card import format_bytes, kv_table
    from ..patches.checkpoint import convert_checkpoint
    from ..patches.converters import get_converter
    from ..table import format_table

    converter = get_converter(args.to)
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None and getattr(args, k) is not False}
    for k in options:
        if k not in converter.option_names:
            valid = ", ".join(_flag(o) for o in converter.option_names if o in OPTIONS)
            raise ValueError(f"{_flag(k)} does not apply to --to {args.to}; its options: {valid or 'none'}")
    r = convert_checkpoint(args.src, args.dst, args.to, options, dtype=args.dtype, force=args.force,
                           dry_run=args.dry_run, progress=not args.no_progress)
    rows = [
        {"": "source", "value": str(r.src)},
        {"": "destination", "value": str(r.dst) + ("  (dry run: nothing written)" if r.dry_run else "")},
        {"": "conversion", "value": f"{r.summary}, {r.dtype}"},
        {"": "checkpoint", "value": ("native transformers (streamed shard by shard)" if r.streamed else
                                     "native transformers" if r.native else
                                     "attnzoo attention (patched in memory; reload with attnzoo.from_pretrained)")},
        {"": "tensors rewritten", "value": r.rewritten},
        {"": "weights", "value": f"{format_bytes(r.bytes_before)} -> {format_bytes(r.bytes_after)}"},
        {"": "time", "value": f"{r.seconds:.1f} s"},
    ] + [{"": "note", "value": n} for n in r.notes]
    if r.dry_run and r.plan:
        print(format_table(r.plan, title="plan: tensors rewritten (everything else is copied as is)"))
        print()
    print(format_table(rows, ["", "value"], title="attnzoo convert"))
    print()
    table = kv_table([("before: " + _layouts(r.layouts_before), r.layouts_before),
                      ("after: " + _layouts(r.layouts_after), r.layouts_after)], r.dtype)
    print(format_table(table, title=f"KV cache, batch 1, {r.dtype} (per token: {r.kv_change()})"))
    return 0


def _layouts(layouts) -> str:
    kinds = sorted({lay.describe() for lay in layouts})
    return kinds[0] if len(kinds) == 1 else "mixed: " + "; ".join(kinds)
