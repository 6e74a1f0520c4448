"""Show a checkpoint's attention layout and what its KV cache costs, as it is and converted.

Reads config.json only (no weights). The KV-cache table gives bytes per token and what the caches
hold at 8k/32k/128k tokens (batch 1; sliding-window layers keep their window only) for the model as it is
and for candidate conversions:
MHA, GQA-8, MQA and MLA at this model's own shapes: MLA caches one latent per token, not keys and values, so its
per-layer cost is (kv_rank + rope_dim) x bytes; the rows are the -68.75% and -87.5% budgets of the model's
cache as it is (attnzoo.conversion.mla.budget_shapes), and --kv-rank/--rope-dim add one of your own.

example:
  attnzoo info ./llama-3-70b
"""
from __future__ import annotations

NAME = "info"
HELP = "show the attention layout and KV-cache costs of a checkpoint"


def add_arguments(p):
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (with config.json)")
    p.add_argument("--dtype", default=None, help="cache dtype (default: the checkpoint's dtype, else float16)")
    p.add_argument("--kv-rank", type=int, default=None, help="MLA latent size for one more candidate row")
    p.add_argument("--rope-dim", type=int, default=None, help="MLA decoupled RoPE dims of that row (default: "
                                                              "the -68.75%% budget's)")


def layout(config) -> dict:
    """Attention facts of a transformers config (the text/decoder part of composite models)."""
    from ..kv import attention_sizes

    return attention_sizes(config)


def candidates(lay: dict, kv_rank: int | None = None, rope_dim: int | None = None,
               rotary_dim: int | None = None) -> list[tuple[str, list]]:
    """``(label, one KVLayout per layer)`` for MHA, GQA-8, MQA and MLA at this model's sizes (the MLA budgets
    of :data:`~attnzoo.conversion.mla.BUDGETS`, and ``kv_rank``/``rope_dim`` when given)."""
    from ..conversion.mla import BUDGETS, budget_shapes
    from ..kv import KVLayout

    L, H, hd = lay["layers"], lay["heads"], lay["head_dim"]
    rows = [(f"MHA ({H} KV heads)", [KVLayout(H, hd)] * L)]
    if H % 8 == 0 and H > 8:
        rows.append(("GQA-8", [KVLayout(8, hd)] * L))
    rows.append(("MQA (1 KV head)", [KVLayout(1, hd)] * L))
    per_token, rd = 2 * lay["kv_heads"] * hd, rotary_dim or hd
    for saving in BUDGETS:
        r, d = budget_shapes(per_token, rd, saving)
        rows.append((f"MLA -{saving:.2%} ({r} latent + {d} rope)", [KVLayout(latent=r + d)] * L))
    if kv_rank is not None or rope_dim is not None:
        r0, d0 = budget_shapes(per_token, rd, BUDGETS[0])
        r, d = kv_rank if kv_rank is not None else r0, rope_dim if rope_dim is not None else d0
        rows.append((f"MLA ({r} latent + {d} rope)", [KVLayout(latent=r + d)] * L))
    return rows


def run(args) -> int:
    import torch

    from ..checkpoint_io import load_config, resolve_model_dir
    from ..conversion.card import kv_table
    from ..errors import UnsupportedArchitectureError
    from ..kv import kv_layouts
    from ..patches.adapters import adapter_for
    from ..record import get_record
    from ..table import format_table

    path = resolve_model_dir(args.model_dir, "MODEL_DIR")
    config = load_config(path, "MODEL_DIR")
    dtype = args.dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None) or torch.float16
    lay = layout(config)
    record = get_record(config)
    try:
        adapter = adapter_for(config)
        arch = f"{adapter.name} ({'native: num_key_value_heads' if adapter.native else 'attnzoo modules'})"
    except UnsupportedArchitectureError:
        arch = "not supported by attnzoo.patch"
    kind = "MHA" if lay["kv_heads"] == lay["heads"] else ("MQA" if lay["kv_heads"] == 1 else f"GQA-{lay['kv_heads']}")
    attention = f"{kind}: {lay['heads']} query heads, {lay['kv_heads']} KV heads, head_dim {lay['head_dim']}"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None):  # native MLA (DeepSeek-V2/V3)
        kind = "MLA"
        arch = f"{text.model_type} (native MLA; attnzoo.patch(model, 'mla') gives it absorbed decode)"
        attention = (f"MLA: {lay['heads']} query heads, latent {text.kv_lora_rank} + rope {text.qk_rope_head_dim} "
                     f"per token, q/k head {text.qk_nope_head_dim} + {text.qk_rope_head_dim}, v head "
                     f"{text.v_head_dim}")
    layouts = kv_layouts(config)
    if record or len({lay_.describe() for lay_ in layouts}) > 1:
        kinds = [lay_.describe() for lay_ in layouts]
        per_layer = "; ".join(kinds) if len(set(kinds)) > 1 else f"{kinds[0]} in every layer"
        attention = f"{'patched: ' if record else ''}{lay['heads']} query heads; {per_layer}"
    rows = [
        {"": "model_type", "value": getattr(config, "model_type", "?")},
        {"": "adapter", "value": arch},
        {"": "layers", "value": str(lay["layers"])},
        {"": "hidden size", "value": str(lay["hidden"])},
        {"": "attention", "value": attention},
        {"": "cache dtype", "value": str(dtype).replace("torch.", "")},
    ]
    if record:
        opts = ", ".join(f"{k}={v}" for k, v in (record.get("options") or {}).items() if v is not None)
        rows.append({"": "attnzoo patch", "value": f"{record.get('variant')} ({opts}) on "
                                                   f"{len(record.get('modules') or {})} modules, attnzoo "
                                                   f"{record.get('version')}"})
    print(format_table(rows, ["", "value"], title=f"attnzoo info {path}"))
    print()
    from ..patches.adapters import rotary_dim_of

    others = [] if kind == "MLA" else candidates(lay, args.kv_rank, args.rope_dim, rotary_dim_of(text, lay["head_dim"]))
    table = kv_table([(f"as is ({'patched' if record else kind})", layouts)] + others, dtype)
    print(format_table(table, title="KV cache per sequence (batch 1)"))
    return 0
