"""List the registered attention variants with their options and KV-cache cost."""
from __future__ import annotations

import json

NAME = "list"
HELP = "list the attention variants"


def add_arguments(p):
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. '*qa'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from .. import registry
    from ..kv import kv_bytes_per_token
    from ..table import format_table

    rows = []
    for name in registry.list_variants(args.pattern):
        e = registry.get(name)
        cfg = e.make_config(**e.example)
        per_tok = kv_bytes_per_token(cfg) if hasattr(cfg, "kv_layout") else None
        rows.append({"variant": name, "description": e.description, "options": ", ".join(cfg.option_names()),
                     "example": ", ".join(f"{k}={v}" for k, v in e.example.items()),
                     "KV B/token (example, fp16)": per_tok})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["variant", "description", "example", "KV B/token (example, fp16)"]))
    return 0
