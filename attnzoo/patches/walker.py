"""The one generic walker behind :func:`attnzoo.patch`: find the attention modules through
the adapter table, select them, and hand them to the variant's converter."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import AttnzooError, NoMatchingModuleError, check_type
from ..kv import element_size
from .adapters import Adapter, adapter_for
from .converters import get_converter
from ..record import get_record, set_record
from .config import PatchConfig
from .report import PatchReport
from .sites import Site, find_sites

__all__ = ["patch", "restore_patch", "attention_sites"]

_MARK = "_attnzoo_patch"


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model={type(model).__name__}: expected a Hugging Face transformers model "
                        "(a torch.nn.Module with a .config)")


def attention_sites(model) -> tuple[Adapter, list[Site]]:
    """The adapter for ``model`` and every attention module it finds there."""
    _check_model(model)
    adapter = adapter_for(model)
    sites = find_sites(model, adapter)
    if not sites:
        raise NoMatchingModuleError(f"{type(model).__name__}: the {adapter.name} adapter found no attention module "
                                    f"(looked for names ending in {[t.pattern for t in adapter.towers]})")
    return adapter, sites


def _select(sites: list[Site], layers, filter_fn) -> list[Site]:
    chosen = sites
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        check_type("layers", layers, (list, tuple, range, set), "a list of layer indices")
        layers = list(layers)
        for i in layers:
            check_type("layers", i, int, "a list of layer indices (ints)")
        present = sorted({s.layer for s in sites})
        missing = [i for i in layers if i not in present]
        if missing:
            raise ValueError(f"layers={layers}: no attention layer with index {missing}; "
                             f"valid indices: {present[0]}..{present[-1]}")
        chosen = [s for s in chosen if s.layer in set(layers)]
    if filter_fn is not None:
        if not callable(filter_fn):
            raise TypeError(f"filter_fn={filter_fn!r}: expected a callable (module, fqn) -> bool")
        chosen = [s for s in chosen if filter_fn(s.module, s.fqn)]
    return chosen


def _kv_per_token(sites: list[Site], dtype) -> int:
    """KV bytes per token over every attention module found (both towers of a composite model)."""
    return sum(s.kv_layout().per_token for s in sites) * element_size(dtype)


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def patch(model, name: str | PatchConfig, *, layers: Iterable[int] | int | None = None,
          filter_fn: Callable[[nn.Module, str], bool] | None = None, **options: Any) -> PatchReport:
    """Swap or convert the attention of a Hugging Face ``model`` in place.

    ``patch(model, attnzoo.GQA(groups=8))`` and ``patch(model, "gqa", groups=8)`` are the same call: the
    string and its options build the typed config (:mod:`attnzoo.patches.config`).

    Args:
        model: a ``transformers`` model of a supported architecture
            (``attnzoo.patches.supported_model_types()``).
        name: a typed config, or the variant's name with its options as keywords: ``"gqa"`` (needs
            ``groups``), ``"mqa"``, ``"mha"``; the sparse patterns ``"sliding_window"``, ``"longformer"``,
            ``"bigbird"`` (docs/surgery.md §4); ``attnzoo list`` shows every option and default.
        layers: only these layer indices (per tower for models with several).
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks attention modules (like torchao's
            ``quantize_``); combined with ``layers`` by AND.
        **options: the variant's options: ``groups`` (KV heads to keep), ``method``
            (``"mean"`` default, ``"svd"``; see :mod:`attnzoo.conversion`), ``kernel``
            (``"attnzoo"``/``"hf"`` for native architectures); ``window``, ``global_tokens``,
            ``global_projections``, ``max_positions``, ``block_size``, ``global_blocks``,
            ``random_blocks``, ``seed`` for the sparse patterns.

    Returns:
        a :class:`PatchReport`.

    Raises:
        UnsupportedArchitectureError: no adapter for the model (lists the supported ones).
        NoMatchingModuleError: the selection matched no attention module.
        AttnzooError: the model is already patched.
        ValueError / TypeError: a bad option, naming it, its value and what is valid.
    """
    _check_model(model)
    previous = getattr(model, _MARK, None) or get_record(model.config)
    if previous:
        what = previous.variant if isinstance(previous, PatchReport) else previous.get("variant")
        raise AttnzooError(f"{type(model).__name__} is already patched ({what!r}); patching twice is not "
                           "supported: start again from the original model")
    if isinstance(name, PatchConfig):
        if options:
            raise TypeError(f"patch(model, {type(name).__name__}(...), {', '.join(options)}=...): pass the options "
                            "in the config or as keywords with the variant's name, not both")
        config, name = name, name.variant
    else:
        config = options
    converter = get_converter(name)
    own = converter.patch_own(model, config, layers=layers, filter_fn=filter_fn)
    if own is not None:  # the converter takes the whole model (mla on DeepSeek-V3; arrcoc's run-time plug-in)
        setattr(model, _MARK, own)
        return own
    adapter, sites = attention_sites(model)
    opts = converter.options(adapter, config)
    selected = _select(sites, layers, filter_fn)
    if not selected:
        raise NoMatchingModuleError(f"patch(model, {name!r}): no attention module matched (layers={layers!r}, "
                                    f"filter_fn={getattr(filter_fn, '__name__', filter_fn)!r}); the {adapter.name} "
                                    f"adapter found {len(sites)}: {sites[0].fqn} ... {sites[-1].fqn}")
    plans = {s.fqn: converter.plan(s, opts) for s in selected}  # every check before any change
    native = converter.is_native(adapter, sites, selected, plans, opts)
    dtype = _model_dtype(model)
    params_before = _param_count(model)  # before prepare(), which may already convert (calib_order='sequential')
    kv_bytes_before = _kv_per_token(sites, dtype)
    opts = converter.prepare(model, adapter, selected, opts, native)
    for s in selected:
        converter.apply(s, plans[s.fqn], opts, native)
    info = converter.finish(model, adapter, sites, plans, opts, native)
    notes = [n for n in (opts.pop("kernel_note", None), info.get("note")) if n]
    if not native:
        set_record(model.config, {
            "version": __version__, "variant": name, "adapter": adapter.name, "options": opts, "modules": plans,
            "kv_layout": [s.kv_layout().to_json() for s in sites]})
    report = PatchReport(variant=name, architecture=adapter.name, options=opts, modules=[s.fqn for s in selected],
                         params_before=params_before, params_after=_param_count(model),
                         kv_bytes_per_token_before=kv_bytes_before,
                         kv_bytes_per_token_after=_kv_per_token(sites, dtype),
                         native=native, notes=notes)
    setattr(model, _MARK, report)
    return report


def restore_patch(model, record: dict[str, Any]) -> None:
    """Rebuild the structure a recorded patch made (no weight conversion): the reload path."""
    converter = get_converter(record["variant"])
    adapter, sites = attention_sites(model)
    if record.get("adapter") not in (None, adapter.name):
        raise ValueError(f"config.json records a patch made through the {record['adapter']!r} adapter, but this "
                         f"model is served by {adapter.name!r}")
    by_name = {s.fqn: s for s in sites}
    modules = record.get("modules") or {}
    unknown = [f for f in modules if f not in by_name]
    if unknown:
        raise ValueError(f"config.json's attnzoo record names modules this model does not have: {unknown[:3]}")
    opts = dict(record.get("options") or {})
    for fqn, plan in modules.items():
        converter.restore(by_name[fqn], plan, opts)
    converter.finish(model, adapter, sites, modules, opts, native=False)
