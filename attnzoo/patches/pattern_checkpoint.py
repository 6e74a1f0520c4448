"""``attnzoo convert --to sliding_window | longformer | bigbird``: a checkpoint directory to a sparse pattern.

* A native sliding window (mistral and phi3: ``sliding_window``; qwen2, qwen3, gemma2:
  ``layer_types``) changes no weight: the shards are **streamed** (every tensor copied byte for
  byte by :func:`~attnzoo.conversion.streaming.run_stream`, pickled sources rewritten as
  safetensors) and ``config.json`` gets the window (:func:`.pattern_converters.set_native_window`).
  The result is a plain ``transformers`` checkpoint.
* Everything else is loaded, patched **in memory** with :func:`attnzoo.patch` (the same code as
  on a live model) and saved with the patch recorded in ``config.json``. Longformer's position
  extension and global projections add a few tensors (the position table grows to
  ``max_positions`` rows; ``global_projections`` copies q/k/v per layer); the model is held in
  memory once.

Either way DST is written through a temporary directory renamed at the end, gets SRC's
side files (``tokenizer_config.json``'s ``model_max_length`` follows ``max_positions``) and a
model card; SRC is only read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..conversion.card import pattern_model_card
from ..conversion.output import copy_side_files, staged_output
from ..conversion.streaming import plan_stream, run_stream_with_bar
from ..kv import _elem
from ..ops.sparse import SlidingWindow
from .adapters import Adapter, adapter_for
from .position_table import position_tables

__all__ = ["PATTERN_TARGETS", "PATTERN_FLAGS", "convert_pattern"]

PATTERN_TARGETS = ("sliding_window", "longformer", "bigbird")
#: option -> the targets that take it (CLI flags are the option names with dashes)
PATTERN_FLAGS: dict[str, tuple[str, ...]] = {
    "window": PATTERN_TARGETS,
    "global_tokens": ("longformer",),
    "global_projections": ("longformer",),
    "max_positions": ("longformer", "bigbird"),
    "block_size": ("bigbird",),
    "global_blocks": ("bigbird",),
    "random_blocks": ("bigbird",),
    "seed": ("bigbird",),
}


def check_pattern_options(variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """Drop unset options; refuse those the target does not take (naming the flag and its targets)."""
    opts = {k: v for k, v in options.items() if v is not None and v is not False}
    for key in opts:
        targets = PATTERN_FLAGS.get(key, ())
        if variant not in targets:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} applies to --to {', '.join(targets) or '?'}, not --to {variant}")
    return opts


def _native_style(adapter: Adapter, config) -> str | None:
    return adapter.window_native(config) if adapter.native else None


def convert_pattern(source, dst: Path, adapter: Adapter, variant: str, options: dict[str, Any],
                    dtype: torch.dtype | None, dtype_label: str, force: bool, dry_run: bool, progress: bool):
    """Convert ``source`` (a :class:`~attnzoo.conversion.source.SourceCheckpoint`) into ``dst``."""
    from transformers import AutoConfig

    from .checkpoint import ConversionResult

    config = AutoConfig.from_pretrained(source.path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    style = _native_style(adapter, text) if variant == "sliding_window" else None
    result = ConversionResult(src=source.path, dst=dst, variant=variant, groups=0, method="-", native=False,
                              heads=int(getattr(text, "num_attention_heads", 0) or 0), kv_before=0,
                              per_token_before=0, per_token_after=0, bytes_before=source.total_bytes(),
                              bytes_after=0, tensors_rewritten=0, tensors_total=0, dtype=dtype_label,
                              dry_run=dry_run, options=dict(options))
    if style is not None:
        _streamed_native_window(source, dst, adapter, config, text, style, options, dtype, force, dry_run, progress,
                                result)
    else:
        _in_memory(source, dst, variant, options, dtype, force, dry_run, result)
    return result


def _kv_per_token(text, dtype_label: str) -> int:
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    hd = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return int(text.num_hidden_layers) * 2 * kv * hd * _elem(getattr(torch, dtype_label, torch.float32))


def _streamed_native_window(source, dst, adapter, config, text, style, options, dtype, force, dry_run, progress,
                            result) -> None:
    from .checkpoint import stream_spec
    from .pattern_converters import set_native_window

    window = options.get("window")
    if window is None:
        raise ValueError("--to sliding_window needs --window W (keys on each side of a query; causal: i-W .. i)")
    SlidingWindow(window=window, causal=True)  # checks window (ValueError naming it)
    spec = stream_spec(adapter, source.config)
    plan = plan_stream(source, spec, spec.kv_heads, "mean", dtype)  # nothing to rewrite: every tensor copied
    before = getattr(text, "sliding_window", None)
    set_native_window(text, window, style)
    result.native = True
    result.groups = result.kv_before = spec.kv_heads
    result.per_token_before = result.per_token_after = _kv_per_token(text, result.dtype)
    result.tensors_total = sum(len(s.tensors) for s in plan.shards)
    result.bytes_after = plan.bytes_out()
    result.plan = [{"tensors": "config.json: sliding_window", "count": 1, "shape before": str(before),
                    "shape after": str(text.sliding_window), "dtype": "-"}]
    result.notes.append(f"native: config.sliding_window={window + 1} (transformers keeps {window + 1} keys, the "
                        f"query's own included); every tensor copied as is (streamed)")
    if dtype is not None:
        config.dtype = result.dtype
    if dry_run:
        return
    with staged_output(source.path, dst, force, result.notes) as tmp:
        result.files = run_stream_with_bar(plan, tmp, progress)
        config.save_pretrained(tmp)
        result.files += ["config.json"] + copy_side_files(source.path, tmp)
        _write_card(tmp, source, dst, result, config)


def _in_memory(source, dst, variant, options, dtype, force, dry_run, result) -> None:
    from transformers import AutoConfig

    from .reload import from_pretrained, model_class_for
    from .walker import patch

    if dry_run:  # the plan on a model without storage
        config = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            model = model_class_for(config)._from_config(config, dtype=dtype or torch.float32)
    else:
        model = from_pretrained(source.path, dtype=dtype or "auto")
    adapter = adapter_for(model)
    grows = options.get("max_positions") is not None and adapter.positions
    before = {t.fqn: tuple(t.module.weight.shape) for t in position_tables(model, adapter)} if grows else {}
    report = patch(model, variant, **options)
    rec = getattr(model.config, "attnzoo", None) or {}
    result.native = report.native
    result.options = dict(report.options)
    result.notes += list(report.notes)
    plans = list((rec.get("modules") or {}).values())
    result.groups = result.kv_before = plans[0]["kv_heads"] if plans else 0
    elem_model = _elem(next(model.parameters()).dtype)
    elem_out = _elem(dtype) if dtype is not None else elem_model
    result.per_token_before = report.kv_bytes_per_token_before // elem_model * elem_out
    result.per_token_after = report.kv_bytes_per_token_after // elem_model * elem_out
    result.tensors_rewritten = len(report.modules)
    modes: dict[tuple, int] = {}
    for fqn in report.modules:
        key = (_kind(fqn), (rec.get("modules") or {}).get(fqn, {}).get("mode", "native"))
        modes[key] = modes.get(key, 0) + 1
    result.plan = [{"tensors": k, "count": n, "shape before": "dense", "shape after": f"{variant} ({mode})",
                    "dtype": result.dtype} for (k, mode), n in modes.items()]
    result.plan += [{"tensors": t.fqn + ".weight", "count": 1, "shape before": "x".join(map(str, before[t.fqn])),
                     "shape after": "x".join(map(str, t.module.weight.shape)), "dtype": result.dtype}
                    for t in (position_tables(model, adapter) if grows else []) if t.fqn in before]
    if dry_run:
        result.bytes_after = report.params_after * elem_out
        return
    with staged_output(source.path, dst, force, result.notes) as tmp:
        model.save_pretrained(tmp)
        result.files = sorted(p.name for p in tmp.iterdir())
        result.files += copy_side_files(source.path, tmp)
        result.bytes_after = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if options.get("max_positions"):
            _update_tokenizer_length(tmp, options["max_positions"], result)
        _write_card(tmp, source, dst, result, model.config)


def _kind(fqn: str) -> str:
    import re

    return re.sub(r"\.\d+\.", ".*.", fqn)


def _update_tokenizer_length(tmp: Path, max_positions: int, result) -> None:
    f = tmp / "tokenizer_config.json"
    if not f.is_file():
        return
    try:
        tok = json.loads(f.read_text())
    except json.JSONDecodeError:
        return
    if isinstance(tok, dict) and "model_max_length" in tok:
        old = tok["model_max_length"]
        tok["model_max_length"] = max_positions
        f.write_text(json.dumps(tok, indent=2) + "\n")
        result.notes.append(f"tokenizer_config.json: model_max_length {old} -> {max_positions}")


def _write_card(tmp: Path, source, dst: Path, result, config) -> None:
    readme = source.path / "README.md"
    archs = getattr(config, "architectures", None) or []
    text = pattern_model_card(name=dst.name, source=str(source.path), model_type=source.config.get("model_type", "?"),
                              variant=result.variant, options=result.options, dtype=result.dtype,
                              native=result.native, version=__version__, notes=result.notes,
                              model_class=archs[0] if archs else "AutoModel",
                              source_card=readme.read_text(errors="replace") if readme.is_file() else None)
    (tmp / "README.md").write_text(text)
