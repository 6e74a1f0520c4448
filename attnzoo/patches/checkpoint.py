"""Convert a checkpoint directory (what ``attnzoo convert`` runs).

KV-head targets (``gqa``, ``mqa``, ``mha``):

* Native architectures (``num_key_value_heads``: the llama family, phi3) are converted by
  streaming (:mod:`attnzoo.conversion.streaming`): shard by shard, without building the
  model, memory bounded by a layer's attention weights.
* The others are loaded, patched in memory with :func:`attnzoo.patch`, and saved.

Either way DST is written through a temporary directory renamed at the end, gets SRC's
tokenizer/generation files and a model card, and SRC is only read. The sparse patterns
(``sliding_window``, ``longformer``, ``bigbird``) are converted by :mod:`.pattern_checkpoint`.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .. import __version__
from ..checkpoint_io import BUILTIN, hf_progress_bars, load_config
from ..conversion.card import model_card
from ..conversion.heads import check_groups
from ..conversion.methods import check_method
from ..conversion.output import check_destination, copy_side_files, staged_output
from ..conversion.source import SourceCheckpoint
from ..conversion.streaming import StreamSpec, plan_stream, run_stream_with_bar
from ..errors import check_choice
from ..kv import _elem
from .adapters import Adapter, adapter_for, rope_spec_of
from .pattern_checkpoint import PATTERN_TARGETS, check_pattern_options, convert_pattern
from .record import get_record

__all__ = ["TARGETS", "KV_TARGETS", "ConversionResult", "stream_spec", "convert_checkpoint", "parse_dtype"]

KV_TARGETS = ("gqa", "mqa", "mha")
TARGETS = KV_TARGETS + PATTERN_TARGETS
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass
class ConversionResult:
    src: Path
    dst: Path
    variant: str
    groups: int
    method: str
    native: bool
    heads: int
    kv_before: int
    per_token_before: int
    per_token_after: int
    bytes_before: int
    bytes_after: int
    tensors_rewritten: int
    tensors_total: int
    dtype: str
    dry_run: bool
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)  # what gets rewritten, grouped
    options: dict[str, Any] = field(default_factory=dict)  # sparse patterns: the options as applied


def parse_dtype(name) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    check_choice("dtype", name, _DTYPE_NAMES + ("auto",))
    return getattr(torch, name)


def _ns(config: dict) -> SimpleNamespace:
    return SimpleNamespace(**config)


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def stream_spec(adapter: Adapter, config: dict) -> StreamSpec:
    """The streaming converter's view of a native checkpoint (from config.json and the adapter row)."""
    c = _ns(_text_config(config))
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    hd = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    projs = (adapter.qkv, adapter.o) if adapter.layout == "concat" else (adapter.q, adapter.k, adapter.v, adapter.o)
    tower = adapter.towers[0].pattern
    pattern = rf"(?:.*\.)?{tower}\.(?P<proj>{'|'.join(projs)})\.(?P<kind>weight|bias)"
    tied = ("lm_head.weight", "model.embed_tokens.weight") if getattr(c, "tie_word_embeddings", False) else None
    return StreamSpec(pattern=pattern, layout=adapter.layout, heads=heads, kv_heads=kv, head_dim=hd,
                      rope=rope_spec_of(adapter, c, hd), q=adapter.q, k=adapter.k, v=adapter.v, o=adapter.o,
                      qkv=adapter.qkv, tied_embeddings=tied)


def _target_groups(variant: str, groups, heads: int) -> int:
    check_choice("--to", variant, KV_TARGETS)
    if variant == "mqa":
        if groups not in (None, 1):
            raise ValueError(f"--groups {groups}: mqa keeps one KV head; omit --groups or use --to gqa")
        return 1
    if variant == "mha":
        if groups not in (None, heads):
            raise ValueError(f"--groups {groups}: mha keeps one KV head per query head ({heads})")
        return heads
    if groups is None:
        raise ValueError("--to gqa needs --groups N (the number of KV heads to keep)")
    return groups


def _dtype_label(dtype, config) -> str:
    if dtype is not None:
        return str(dtype).replace("torch.", "")
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _source_dir(src) -> Path:
    """SRC as a path; ``"builtin"`` is the packaged model, as for ``eval`` and ``uptrain``."""
    if str(src) == BUILTIN:
        from ..data.model import builtin_model_dir

        return builtin_model_dir()
    return Path(src)


def convert_checkpoint(src, dst, variant: str, groups: int | None = None, method: str | None = None,
                       dtype: str | None = None, force: bool = False, dry_run: bool = False,
                       progress: bool = True, options: dict[str, Any] | None = None) -> ConversionResult:
    """Convert checkpoint directory ``src`` (or ``"builtin"``, the packaged model) into ``dst``; see the
    module docstring.

    ``groups``/``method`` apply to the KV-head targets, ``options`` (``window``, ``global_tokens``,
    ``global_projections``, ``max_positions``, ``block_size``, ``global_blocks``, ``random_blocks``,
    ``seed``) to the sparse patterns."""
    start = time.time()
    src, dst = _source_dir(src), Path(dst)
    check_choice("--to", variant, TARGETS)
    options = check_pattern_options(variant, options or {})
    if variant in PATTERN_TARGETS:
        for flag, value in (("--groups", groups), ("--method", method)):
            if value is not None:
                raise ValueError(f"{flag} applies to --to {', '.join(KV_TARGETS)}, not --to {variant}")
    else:
        method = method or "mean"
        check_method(method)
    torch_dtype = parse_dtype(dtype)
    source = SourceCheckpoint(src)  # checks config and every shard before anything is written
    load_config(src, "SRC")  # transformers can read the config (errors name the file)
    if not dry_run:
        check_destination(src, dst, force)
    adapter = adapter_for(source.config)
    if get_record(source.config):
        raise ValueError(f"{src} already holds an attnzoo patch ({source.config['attnzoo'].get('variant')!r}); "
                         "convert the original checkpoint instead")
    with hf_progress_bars(progress):  # progress=False (--no-progress) silences transformers' bars too
        if variant in PATTERN_TARGETS:
            result = convert_pattern(source, dst, adapter, variant, options, torch_dtype,
                                     _dtype_label(torch_dtype, source.config), force, dry_run, progress)
        elif adapter.native:
            result = _convert_streaming(source, dst, adapter, variant, groups, method, torch_dtype, force, dry_run,
                                        progress)
        else:
            result = _convert_in_memory(source, dst, adapter, variant, groups, method, torch_dtype, force, dry_run)
    result.seconds = time.time() - start
    return result


def _write_card(tmp: Path, source: SourceCheckpoint, dst: Path, r: ConversionResult) -> None:
    readme = source.path / "README.md"
    text = model_card(name=dst.name, source=str(source.path), model_type=source.config.get("model_type", "?"),
                      variant=r.variant, groups=r.groups, method=r.method, heads=r.heads, kv_before=r.kv_before,
                      dtype=r.dtype, per_token_before=r.per_token_before, per_token_after=r.per_token_after,
                      native=r.native, version=__version__,
                      source_card=readme.read_text(errors="replace") if readme.is_file() else None)
    (tmp / "README.md").write_text(text)


def _convert_streaming(source, dst, adapter, variant, groups, method, dtype, force, dry_run, progress):
    import json

    spec = stream_spec(adapter, source.config)
    target = _target_groups(variant, groups, spec.heads)
    check_groups(target, spec.heads, spec.kv_heads, str(source.path))
    if target < spec.kv_heads and check_method(method).linear_keys:
        why = adapter.linear_keys(_ns(_text_config(source.config)))
        if why:
            raise ValueError(f"method={method!r} needs keys that reach the scores linearly, but {why}; "
                             "use --method mean")
    plan = plan_stream(source, spec, target, method, dtype)
    n_layers = len(plan.layers)
    label = _dtype_label(dtype, source.config)
    elem = _elem(dtype or getattr(torch, label, torch.float32))
    result = ConversionResult(
        src=source.path, dst=dst, variant=variant, groups=target, method=method, native=True, heads=spec.heads,
        kv_before=spec.kv_heads, per_token_before=n_layers * 2 * spec.kv_heads * spec.head_dim * elem,
        per_token_after=n_layers * 2 * target * spec.head_dim * elem, bytes_before=source.total_bytes(),
        bytes_after=plan.bytes_out(), tensors_rewritten=len(plan.computed),
        tensors_total=sum(len(s.tensors) for s in plan.shards), dtype=label, dry_run=dry_run)
    if plan.dropped:
        result.notes.append(f"dropped {', '.join(plan.dropped)} (tied to the embeddings; transformers re-ties it)")
    groups_of: dict[tuple, int] = {}
    for t in plan.computed:
        kind = re.sub(r"\.\d+\.", ".*.", t.name)
        key = (kind, tuple(t.source.shape), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        groups_of[key] = groups_of.get(key, 0) + 1
    result.plan = [{"tensors": k[0], "count": n, "shape before": "x".join(map(str, k[1])),
                    "shape after": "x".join(map(str, k[2])), "dtype": k[3]} for k, n in groups_of.items()]
    if dry_run:
        return result
    with staged_output(source.path, dst, force, result.notes) as tmp:
        result.files = run_stream_with_bar(plan, tmp, progress)
        config = dict(source.config)
        text = _text_config(config)
        text["num_key_value_heads"] = target
        if dtype is not None:
            config["dtype"] = label
            if "torch_dtype" in config:
                config["torch_dtype"] = label
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        result.files += copy_side_files(source.path, tmp)
        _write_card(tmp, source, dst, result)
    return result


def _convert_in_memory(source, dst, adapter, variant, groups, method, dtype, force, dry_run):
    from transformers import AutoConfig

    from .reload import from_pretrained, model_class_for
    from .walker import patch

    config = AutoConfig.from_pretrained(source.path)
    options: dict[str, Any] = {"method": method}
    if dry_run:  # plan on a model without storage
        with torch.device("meta"):
            model = model_class_for(config)._from_config(config, dtype=dtype or torch.float32)
        options["method"] = "mean"  # the numbers do not depend on the method; its checks ran below
        _check_in_memory_method(model, variant, groups, method)
    else:
        model = from_pretrained(source.path, dtype=dtype or "auto")
    sites_heads = _heads_of(model)
    target = _target_groups(variant, groups, sites_heads)
    report = patch(model, variant, **({"groups": groups} if variant == "gqa" else {}), **options)
    label = _dtype_label(dtype, source.config)
    elem_model = _elem(next(model.parameters()).dtype)
    elem_out = _elem(dtype) if dtype is not None else elem_model

    def scale(b):  # bytes in the model's dtype -> bytes in the output dtype
        return b // elem_model * elem_out
    plan_rows = [{"tensors": fqn, "count": 1, "shape before": f"{p['heads']} q / {p['kv_heads_before']} kv heads",
                  "shape after": f"{p['heads']} q / {p['kv_heads']} kv heads", "dtype": label}
                 for fqn, p in (getattr(model.config, "attnzoo", None) or {}).get("modules", {}).items()]
    result = ConversionResult(
        plan=plan_rows,
        src=source.path, dst=dst, variant=variant, groups=target, method=method, native=report.native,
        heads=sites_heads, kv_before=_kv_before(report, model), per_token_before=scale(report.kv_bytes_per_token_before),
        per_token_after=scale(report.kv_bytes_per_token_after), bytes_before=source.total_bytes(),
        bytes_after=0, tensors_rewritten=len(report.modules), tensors_total=len(report.modules), dtype=label,
        dry_run=dry_run, notes=list(report.notes))
    if dry_run:
        result.bytes_after = report.params_after * elem_out
        return result
    with staged_output(source.path, dst, force, result.notes) as tmp:
        model.save_pretrained(tmp)
        result.files = sorted(p.name for p in tmp.iterdir())
        result.files += copy_side_files(source.path, tmp)
        result.bytes_after = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        _write_card(tmp, source, dst, result)
    return result


def _heads_of(model) -> int:
    from .walker import attention_sites

    return attention_sites(model)[1][0].heads


def _kv_before(report, model) -> int:
    rec = get_record(model.config) or {}
    plans = list((rec.get("modules") or {}).values())
    return plans[0]["kv_heads_before"] if plans else 0


def _check_in_memory_method(model, variant, groups, method) -> None:
    """Run patch()'s per-site checks for ``method`` on a meta model without converting."""
    from .converters import get_converter
    from .walker import attention_sites

    conv = get_converter(variant)
    adapter, sites = attention_sites(model)
    opts = conv.options(adapter, {"method": method, **({"groups": groups} if variant == "gqa" else {})})
    for s in sites:
        conv.plan(s, opts)
