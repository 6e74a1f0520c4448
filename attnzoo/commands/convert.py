"""Convert a local checkpoint's attention: MHA -> GQA/MQA (or back to MHA).

Native architectures (llama family, phi3: ``num_key_value_heads``) are converted by
streaming safetensors shard by shard, without building the model; the result is a plain
``transformers`` checkpoint. Others (gpt2, gpt_neox, bert, roberta, vit, clip) are patched in
memory and saved with the patch recorded in config.json (reload with
``attnzoo.from_pretrained``). DST is written through a temporary directory and renamed at
the end; SRC is never modified.

examples:
  attnzoo convert ./llama-2-7b ./llama-2-7b-gqa8 --to gqa --groups 8
  attnzoo convert ./llama-2-7b ./llama-2-7b-mqa --to mqa --method svd --dry-run
"""
from __future__ import annotations

NAME = "convert"
HELP = "convert a checkpoint's attention (MHA -> GQA/MQA)"


def add_arguments(p):
    from ..conversion.methods import METHODS

    p.add_argument("src", metavar="SRC", help="source checkpoint directory (read only)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--to", required=True, metavar="VARIANT", help="gqa, mqa or mha")
    p.add_argument("--groups", type=int, default=None, help="KV heads to keep (gqa)")
    p.add_argument("--method", default="mean",
                   help="initialisation of the merged heads: " + "; ".join(f"{m.name}: {m.description}"
                                                                           for m in METHODS.values()))
    p.add_argument("--dtype", default="auto", help="output dtype: auto (as stored), float32, float16, bfloat16")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the savings; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..conversion.card import format_bytes, kv_table
    from ..patches.checkpoint import convert_checkpoint
    from ..table import format_table

    r = convert_checkpoint(args.src, args.dst, args.to, groups=args.groups, method=args.method, dtype=args.dtype,
                           force=args.force, dry_run=args.dry_run, progress=not args.no_progress)
    rows = [
        {"": "source", "value": str(r.src)},
        {"": "destination", "value": str(r.dst) + ("  (dry run: nothing written)" if r.dry_run else "")},
        {"": "conversion", "value": f"{r.variant}: {r.heads} query heads, KV heads {r.kv_before} -> {r.groups}, "
                                    f"method={r.method}, {r.dtype}"},
        {"": "checkpoint", "value": "native transformers (streamed shard by shard)" if r.native
         else "attnzoo modules (patched in memory; reload with attnzoo.from_pretrained)"},
        {"": "tensors rewritten", "value": f"{r.tensors_rewritten} of {r.tensors_total}" if r.native
         else f"{r.tensors_rewritten} attention modules"},
        {"": "weights", "value": f"{format_bytes(r.bytes_before)} -> {format_bytes(r.bytes_after)}"},
        {"": "time", "value": f"{r.seconds:.1f} s"},
    ] + [{"": "note", "value": n} for n in r.notes]
    if r.dry_run and r.plan:
        print(format_table(r.plan, title="plan: tensors rewritten (everything else is copied as is)"))
        print()
    print(format_table(rows, ["", "value"], title="attnzoo convert"))
    print()
    saved = 1 - r.per_token_after / r.per_token_before if r.per_token_before else 0.0
    print(format_table(kv_table([(f"before: {r.kv_before} KV heads", r.per_token_before),
                                 (f"after: {r.groups} KV head{'s' if r.groups != 1 else ''}", r.per_token_after)]),
                       title=f"KV cache, batch 1, {r.dtype} ({100 * saved:.1f}% saved)"))
    return 0
