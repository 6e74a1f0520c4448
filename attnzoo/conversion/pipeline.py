"""Convert a checkpoint directory (what ``attnzoo convert`` runs): one pipeline for every method.

1. Read SRC's config and check every shard (:class:`~attnzoo.conversion.source.SourceCheckpoint`); check DST
   (never SRC, never an existing DST without ``force``).
2. Ask the variant's converter whether it can **stream** this checkpoint (:meth:`Converter.stream`): native
   architectures whose conversion is a rewrite of a few tensors and of ``config.json`` (KV heads of the llama
   family and phi3; a native sliding window, config only) are converted shard by shard, without building
   the model, memory bounded by a layer's attention weights.
3. Otherwise load the model, :func:`attnzoo.patch` it **in memory** (the same code as on a live model) and
   save it, the patch recorded in ``config.json`` where it is not native.

Either way DST is written through a temporary directory renamed at the end
(:func:`~attnzoo.conversion.output.staged_output`), gets SRC's tokenizer/generation files and a model card
(:func:`~attnzoo.conversion.card.model_card`), and SRC is only read. The result is one
:class:`~attnzoo.conversion.result.ConversionResult`, whose KV figures come from the layers'
:class:`~attnzoo.kv.KVLayout` before and after.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint_io import BUILTIN, hf_progress_bars, load_config
from .card import model_card
from .output import check_destination, copy_side_files, staged_output
from .result import ConversionResult
from .source import SourceCheckpoint
from .streaming import run_stream_with_bar
from ..errors import check_choice
from ..kv import kv_layouts
from ..patches.adapters import adapter_for
from ..patches.converters import converters, get_converter
from ..record import get_record

__all__ = ["convert_checkpoint", "parse_dtype", "targets"]

_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def targets() -> list[str]:
    """The variants ``attnzoo convert --to`` takes (every registered converter that writes a checkpoint; a
    run-time plug-in such as ``arrcoc`` is refused with its own message)."""
    return sorted(n for n, c in converters().items() if c.convert_refusal is None)


def parse_dtype(name) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    check_choice("dtype", name, _DTYPE_NAMES + ("auto",))
    return getattr(torch, name)


def _dtype_label(dtype, config) -> str:
    if dtype is not None:
        return str(dtype).replace("torch.", "")
    got = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(got).replace("torch.", "")


def _source_dir(src) -> Path:
    """SRC as a path; ``"builtin"`` is the packaged model, as for ``eval`` and ``uptrain``."""
    if str(src) == BUILTIN:
        from ..data.model import builtin_model_dir

        return builtin_model_dir()
    return Path(src)


def convert_checkpoint(src, dst, variant: str, options: dict[str, Any] | None = None, *, dtype: str | None = None,
                       force: bool = False, dry_run: bool = False, progress: bool = True) -> ConversionResult:
    """Convert checkpoint directory ``src`` (or ``"builtin"``, the packaged model) into ``dst`` with
    ``attnzoo.patch``'s ``variant`` and ``options`` (unset options, None, are dropped); see the module
    docstring. ``progress=False`` also silences transformers' own progress bars."""
    with hf_progress_bars(progress):
        return _convert(src, dst, variant, options, dtype, force, dry_run, progress)


def _convert(src, dst, variant, options, dtype, force, dry_run, progress) -> ConversionResult:
    start = time.time()
    src, dst = _source_dir(src), Path(dst)
    converter = get_converter(variant)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    torch_dtype = parse_dtype(dtype)
    source = SourceCheckpoint(src)  # checks config and every shard before anything is written
    config = load_config(src, "SRC")  # transformers can read the config (errors name the file)
    if not dry_run:
        check_destination(src, dst, force)
    adapter = adapter_for(source.config)
    if get_record(source.config):
        raise ValueError(f"{src} already holds an attnzoo patch ({source.config['attnzoo'].get('variant')!r}); "
                         "convert the original checkpoint instead")
    archs = getattr(config, "architectures", None) or []
    result = ConversionResult(src=source.path, dst=dst, variant=variant, options=dict(options), native=False,
                              streamed=False, dtype=_dtype_label(torch_dtype, config), summary=variant,
                              layouts_before=kv_layouts(config), layouts_after=[],
                              bytes_before=source.total_bytes(), dry_run=dry_run,
                              model_type=getattr(config, "model_type", "?"),
                              model_class=archs[0] if archs else "AutoModel", native_field=converter.native_field,
                              lossy_note=converter.lossy_note)
    job = converter.stream(source, config, adapter, converter.options(adapter, dict(options)), torch_dtype)
    if job is not None:
        _streamed(job, source, dst, torch_dtype, force, progress, result)
    else:
        _in_memory(source, dst, variant, options, torch_dtype, force, result)
    result.seconds = time.time() - start
    return result


def _write_card(tmp: Path, source: SourceCheckpoint, result: ConversionResult) -> None:
    readme = source.path / "README.md"
    text = model_card(result, version=__version__,
                      source_card=readme.read_text(errors="replace") if readme.is_file() else None)
    (tmp / "README.md").write_text(text)


def _kind(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _plan_rows(changes: list[tuple[str, Any, Any, str]]) -> list[dict[str, Any]]:
    """``(name, shape before, shape after, dtype)`` per changed tensor -> rows grouped by kind (layer index as
    ``*``), in first-seen order."""
    grouped: dict[tuple, int] = {}
    for name, before, after, dtype in changes:
        key = (_kind(name), _shape(before), _shape(after), dtype)
        grouped[key] = grouped.get(key, 0) + 1
    return [{"tensors": k[0], "count": n, "shape before": k[1], "shape after": k[2], "dtype": k[3]}
            for k, n in grouped.items()]


def _streamed(job, source, dst, dtype, force, progress, result: ConversionResult) -> None:
    plan = job.plan
    result.native = result.streamed = True
    result.layouts_after = kv_layouts(job.config)
    result.summary = job.converter.summary(job.options, job.config, result.layouts_before, result.layouts_after)
    result.exact = job.converter.exact(job.options, result.layouts_before, result.layouts_after)
    result.notes += job.notes
    if plan.dropped:
        result.notes.append(f"dropped {', '.join(plan.dropped)} (tied to the embeddings; transformers re-ties it)")
    computed = plan.computed
    total = sum(len(s.tensors) for s in plan.shards)
    result.rewritten = (f"{len(computed)} of {total} tensors" if computed
                        else f"none: config.json only, {total} tensors copied")
    result.plan = _plan_rows([(t.name, t.source.shape, t.shape, str(t.dtype).replace("torch.", ""))
                              for t in computed]) + job.config_rows
    result.bytes_after = plan.bytes_out()
    if dtype is not None:
        job.config.dtype = result.dtype
    if result.dry_run:
        return
    with staged_output(source.path, dst, force, result.notes) as tmp:
        result.files = run_stream_with_bar(plan, tmp, progress)
        job.config.save_pretrained(tmp)
        result.files += ["config.json"] + copy_side_files(source.path, tmp)
        _write_card(tmp, source, result)


def _in_memory(source, dst, variant, options, dtype, force, result: ConversionResult) -> None:
    from transformers import AutoConfig

    from ..patches.reload import from_pretrained, model_class_for
    from ..patches.walker import attention_sites, patch

    if result.dry_run:  # the plan on a model without storage
        config = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            model = model_class_for(config)._from_config(config, dtype=dtype or torch.float32)
    else:
        model = from_pretrained(source.path, dtype=dtype or "auto")
    converter = get_converter(variant)
    if result.dry_run and (options.get("method") not in (None, "mean") or options.get("calib") is not None):
        # meta tensors have no data for a data-dependent method: check the method at every site (what patch()
        # checks before changing anything), then plan with mean-pooling (same shapes and KV layouts)
        adapter, sites = attention_sites(model)
        opts = converter.options(adapter, dict(options))
        for s in sites:
            converter.plan(s, opts)
        options = {**options, "method": "mean"}
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = patch(model, variant, **options)
    result.native, result.options = report.native, dict(report.options)
    result.notes += list(report.notes)
    result.layouts_after = kv_layouts(model.config)
    result.summary = converter.summary(result.options, model.config, result.layouts_before, result.layouts_after)
    result.exact = converter.exact(result.options, result.layouts_before, result.layouts_after)
    result.rewritten = f"{len(report.modules)} attention modules"
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    result.plan = _plan_rows([(k, before.get(k), after.get(k), result.dtype)
                              for k in list(before) + [k for k in after if k not in before]
                              if before.get(k) != after.get(k)])
    elem = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    if result.dry_run:
        p = next(model.parameters())
        result.bytes_after = report.params_after * (elem or p.element_size())
        return
    with staged_output(source.path, dst, force, result.notes) as tmp:
        exported = converter.export(model, tmp, result.options, dtype)  # a native checkpoint of another class
        if exported is None:
            model.save_pretrained(tmp)
        else:
            result.native = True
            result.model_class = exported[1]
        result.files = sorted(p.name for p in tmp.iterdir())
        result.files += copy_side_files(source.path, tmp)
        result.bytes_after = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        result.notes += converter.after_save(tmp, result.options)
        _write_card(tmp, source, result)
