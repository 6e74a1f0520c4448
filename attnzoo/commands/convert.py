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
    from ..conversion.pipeline import targets

    p.add_argument("src", metavar="SRC", help="source checkpoint directory (read only), or 'builtin' for the "
                   "packaged model")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--to", required=True, metavar="VARIANT", help=", ".join(targets()))
    g = p.add_argument_group("variant options (from each variant's typed config; attnzoo list --json shows them)")
    for specs, variants in _flags():
        helps = [s.help for s in specs]
        spec = specs[max(range(len(specs)), key=lambda i: helps.count(helps[i]))]  # the most common wording
        common = [v for s, v in zip(specs, variants) if s.help == spec.help]  # the others say their own below
        text = f"{', '.join(common)}: {spec.help}" + "".join(
            f"; {v}: {s.help}" for s, v in zip(specs, variants) if s.help != spec.help) + _defaults(specs, variants)
        if spec.type == "bool":
            g.add_argument(spec.flag, dest=spec.name, action="store_true", default=None, help=text)
        else:
            g.add_argument(spec.flag, dest=spec.name, type=_parser(spec), default=None, metavar=spec.metavar,
                           help=text)
    p.add_argument("--dtype", default="auto", help="output dtype: auto (as stored), float32, float16, bfloat16")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the savings; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _flags():
    """Every option of every convertible variant once (variants by name), with each
    variant's declaration of it: ``[(specs, variants)]``."""
    from ..options import option_specs
    from ..patches.converters import converters

    seen: dict[str, tuple[list, list]] = {}
    for name, converter in converters().items():
        if converter.convert_refusal is not None:  # run-time plug-ins (arrcoc): convert refuses them
            continue
        for spec in option_specs(converter.config_cls):
            specs, variants = seen.setdefault(spec.name, ([], []))
            specs.append(spec)
            variants.append(name)
    return list(seen.values())


def _defaults(specs, variants: list[str]) -> str:
    found: dict[str, list[str]] = {}
    for spec, v in zip(specs, variants):
        found.setdefault("required" if spec.required else repr(spec.default), []).append(v)
    if len(found) == 1:
        (d, _), = found.items()
        return f" (default: {d})" if d != "None" else ""
    return " (default: " + "; ".join(f"{d} for {', '.join(vs)}" for d, vs in found.items()) + ")"


def _parser(spec):
    if spec.parse is not None:
        return spec.parse
    base = spec.type.split("|")[0].strip()
    return {"int": int, "float": float, "str": str}.get(base, str)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args) -> int:
    from ..conversion.card import format_bytes, kv_table
    from ..conversion.pipeline import convert_checkpoint
    from ..kv import describe_layouts
    from ..patches.converters import get_converter
    from ..table import format_table

    converter = get_converter(args.to)
    if converter.convert_refusal is not None:  # a run-time plug-in: its one-line refusal, before its options
        raise ValueError(converter.convert_refusal)
    names = [specs[0].name for specs, _ in _flags()]
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None and getattr(args, k) is not False}
    for k in options:
        if k not in converter.option_names:
            valid = ", ".join(_flag(o) for o in converter.option_names)
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
    table = kv_table([("before: " + describe_layouts(r.layouts_before), r.layouts_before),
                      ("after: " + describe_layouts(r.layouts_after), r.layouts_after)], r.dtype)
    print(format_table(table, title=f"KV cache, batch 1, {r.dtype} (per token: {r.kv_change()})"))
    return 0
