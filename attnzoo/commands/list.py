"""List the registered attention variants with their options and KV-cache cost.

``--json`` prints a list of objects: ``name``, ``description``, ``options`` (a list of ``{name, type,
default, required, doc}``), ``example`` (options that build it), ``kv_bytes_per_token_example`` (a
number: KV-cache bytes per token of one layer built from ``example``, in ``kv_dtype_example``)."""
from __future__ import annotations

import json

NAME = "list"
HELP = "list the attention variants"


def add_arguments(p):
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. '*qa'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from .. import registry
    from ..table import format_table
    from ..variants.config import jsonable

    rows, items = [], []
    for name in registry.list_variants(args.pattern):
        e = registry.get(name)
        cfg = e.make_config(**e.example)
        per_tok = cfg.kv_bytes_per_token() if hasattr(cfg, "kv_bytes_per_token") else None
        rows.append({"variant": name, "description": e.description,
                     "example": ", ".join(f"{k}={v}" for k, v in e.example.items()),
                     "KV B/token (example, fp16)": per_tok})
        items.append({"name": name, "description": e.description, "options": e.config_cls.option_specs(),
                      "example": jsonable(e.example), "kv_bytes_per_token_example": per_tok,
                      "kv_dtype_example": "float16"})
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        print(format_table(rows, ["variant", "description", "example", "KV B/token (example, fp16)"]))
    return 0
