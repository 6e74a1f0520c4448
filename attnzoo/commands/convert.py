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

    p.add_argument("src", metavar="SRC", help="source checkpoint directory (read only), or 'builtin' for the "
                   "packaged model")
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


PATTERN_OPTIONS = ("window", "global_tokens", "global_projections", "max_positions", "block_size", "global_blocks",
                   "random_blocks", "seed")


def run(args) -> int:
    from ..conversion.card import format_bytes, kv_change, kv_table
    from ..patches.checkpoint import KV_TARGETS, convert_checkpoint
    from ..table import format_table

    options = {k: getattr(args, k) for k in PATTERN_OPTIONS}
    r = convert_checkpoint(args.src, args.dst, args.to, groups=args.groups, method=args.method, dtype=args.dtype,
                           force=args.force, dry_run=args.dry_run, progress=not args.no_progress, options=options)
    kv_target = r.variant in KV_TARGETS
    if kv_target:
        what = f"{r.variant}: {r.heads} query heads, KV heads {r.kv_before} -> {r.groups}, method={r.method}, {r.dtype}"
        rewritten = f"{r.tensors_rewritten} of {r.tensors_total}" if r.native else \
            f"{r.tensors_rewritten} attention modules"
    else:
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items() if v is not None)
        what = f"{r.variant}: {opts}, {r.dtype}"
        rewritten = (f"none: config.json only, {r.tensors_total} tensors copied" if r.native
                     else f"{r.tensors_rewritten} attention modules")
    rows = [
        {"": "source", "value": str(r.src)},
        {"": "destination", "value": str(r.dst) + ("  (dry run: nothing written)" if r.dry_run else "")},
        {"": "conversion", "value": what},
        {"": "checkpoint", "value": "native transformers (streamed shard by shard)" if r.native
         else "attnzoo attention (patched in memory; reload with attnzoo.from_pretrained)"},
        {"": "tensors rewritten", "value": rewritten},
        {"": "weights", "value": f"{format_bytes(r.bytes_before)} -> {format_bytes(r.bytes_after)}"},
        {"": "time", "value": f"{r.seconds:.1f} s"},
    ] + [{"": "note", "value": n} for n in r.notes]
    if r.dry_run and r.plan:
        print(format_table(r.plan, title="plan: tensors rewritten (everything else is copied as is)"))
        print()
    print(format_table(rows, ["", "value"], title="attnzoo convert"))
    print()
    if not kv_target:
        return 0
    print(format_table(kv_table([(f"before: {r.kv_before} KV head{'s' if r.kv_before != 1 else ''}", r.per_token_before),
                                 (f"after: {r.groups} KV head{'s' if r.groups != 1 else ''}", r.per_token_after)]),
                       title=f"KV cache, batch 1, {r.dtype} ({kv_change(r.per_token_before, r.per_token_after)})"))
    return 0
