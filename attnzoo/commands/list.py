"""List the registered attention variants with their options and KV-cache cost.

``--json`` prints a list of objects: ``name``, ``description``, ``options`` (the module config's options, a
list of ``{name, type, default, required, doc}``), ``patch_options`` (the same for ``attnzoo.patch`` and
``attnzoo convert --to NAME``, or null when the variant has no converter), ``example`` (options that build it),
``kv_bytes_per_token_example`` (a number: KV-cache bytes per token of one layer built from ``example``, in
``kv_dtype_example``). Plugins (entry-point group ``attnzoo.variants``) are listed with the rest."""
from __future__ import annotations

import fnmatch
import json

NAME = "list"
HELP = "list the attention variants"


def add_arguments(p):
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. '*qa'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import torch

    from .. import registry
    from ..kv import kv_bytes_per_token
    from ..options import option_specs
    from ..table import format_table
    from ..variants.config import jsonable

    rows, items = [], []
    for e in registry.entries():
        if not fnmatch.fnmatchcase(e.name, args.pattern):
            continue
        cfg = e.make_config(**e.example)
        per_tok = kv_bytes_per_token(cfg, torch.float16)
        conv = e.converter
        rows.append({"variant": e.name, "description": e.description,
                     "example": ", ".join(f"{k}={v}" for k, v in e.example.items()),
                     "KV B/token (example, fp16)": per_tok, "patch/convert": "yes" if conv else "-"})
        items.append({"name": e.name, "description": e.description,
                      "options": [s.as_json() for s in option_specs(e.config_cls)],
                      "patch_options": None if conv is None else [s.as_json() for s in option_specs(conv.config_cls)],
                      "example": jsonable(e.example), "kv_bytes_per_token_example": per_tok,
                      "kv_dtype_example": "float16"})
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        print(format_table(rows, ["variant", "description", "example", "KV B/token (example, fp16)",
                                  "patch/convert"]))
    return 0
