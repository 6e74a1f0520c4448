"""Converters: how a variant is put into the attention sites the walker found.

The walker (:mod:`attnzoo.patches.walker`) knows nothing about variants. For
``patch(model, name, **options)`` it looks up the :class:`Converter` registered under
``name`` and calls, in order:

1. ``options(adapter, options)``: check and normalise the keyword options;
2. ``plan(site, opts)`` for every selected site, before anything changes: check the site
   and return a JSON-able entry (recorded in ``config.json``; enough to rebuild the
   structure later);
3. ``is_native(...)``: whether the result is a plain ``transformers`` model;
4. ``prepare(...)``: last whole-model checks; returns the final options (recorded);
5. ``apply(site, plan, opts, native)`` per site (convert weights, restructure), or
   ``restore(site, plan, opts)`` when :func:`attnzoo.from_pretrained` rebuilds the structure;
6. ``finish(...)``: model-wide changes (config fields, the attention kernel).

Before all of it, ``patch_own(model, options, ...)`` may take over a model that already holds the variant
natively (``mla`` on a DeepSeek-V3 model: :func:`attnzoo.patches.hf.mla.patch_deepseek`).

``attnzoo convert`` (:mod:`attnzoo.conversion.pipeline`) runs the same protocol through ``patch`` on a loaded
model, unless ``stream(...)`` returns a :class:`StreamJob`: a conversion of the checkpoint's tensors shard by
shard, without building the model. ``summary``, ``exact``, ``after_save``, ``native_field`` and
``lossy_note`` describe the result (the table at the end of ``attnzoo convert``, the model card).

A variant's converter is named by its registry entry (``attnzoo.register(..., converter=...)``); each method
keeps its converter and typed config in its own folder (``kv_heads/``, ``sliding_window/``, ``longformer/``,
``bigbird/``). The walker does not change when one is added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry
from ..conversion.heads import AttnWeights
from ..conversion.streaming import StreamPlan, StreamSpec
from ..errors import UnknownVariantError, UnsupportedArchitectureError, suggest
from ..kv import KVLayout
from ..variants.config import RopeConfig
from ..variants.dense import DenseConfig
from .adapters import Adapter, rope_spec_of, rope_theta_of
from .config import PatchConfig
from .hf import HFDenseAttention
from .sites import Site

__all__ = ["Converter", "StreamJob", "converters", "get_converter", "build_wrapper", "stream_spec"]


def converters() -> dict[str, Converter]:
    """Every registered variant that ``patch``/``attnzoo convert`` can put into a model, with its converter
    (the registry's entries; built-in and plugins), by name."""
    return {e.name: e.converter for e in registry.entries() if e.converter_ref is not None}


def get_converter(name: str) -> Converter:
    """The converter of variant ``name`` (from its registry entry)."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r}: expected a variant name (str) such as 'gqa'")
    try:
        entry = registry.get(name)
    except UnknownVariantError:
        known = sorted(converters())
        raise UnknownVariantError(f"unknown variant {name!r}.{suggest(name, known)} "
                                  f"patch() converts to: {', '.join(known)}") from None
    conv = entry.converter
    if conv is None:
        raise UnsupportedArchitectureError(
            f"variant {name!r} is registered but has no converter: patch() cannot put it into a Hugging Face model; "
            f"patch() converts to: {', '.join(sorted(converters()))}")
    if conv.name != name:
        raise ValueError(f"the registry entry {name!r} names a converter for {conv.name!r}")
    return conv


@dataclass
class StreamJob:
    """A conversion done by streaming: the tensor ``plan`` and the converted ``config`` to save.
    ``config_rows``: plan rows for configuration-only changes."""

    converter: Converter
    options: dict
    plan: StreamPlan
    config: Any
    notes: list[str] = field(default_factory=list)
    config_rows: list[dict] = field(default_factory=list)


class Converter:
    """Base class; see the module docstring for the protocol. ``config_cls``: the typed patch config
    (:class:`~attnzoo.patches.config.PatchConfig`) whose fields are the converter's options."""

    name = ""
    config_cls: type[PatchConfig] = PatchConfig
    native_field = "config.json"  # where a native result keeps the change (the model card says so)
    convert_refusal: str | None = None  # why `attnzoo convert` cannot take it (a run-time plug-in: arrcoc), or None
    lossy_note = "expect some quality loss until the model is uptrained."

    def stream(self, source, config, adapter: Adapter, opts: dict, dtype) -> StreamJob | None:
        """A streamed conversion of checkpoint ``source`` (its HF ``config``), or None: convert in memory."""
        return None

    def summary(self, opts: dict, config, layouts_before: list[KVLayout], layouts_after: list[KVLayout]) -> str:
        """One line saying what the conversion did."""
        shown = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None and k != "kernel")
        return f"{self.name}: {shown}" if shown else self.name

    def exact(self, opts: dict, layouts_before: list[KVLayout], layouts_after: list[KVLayout]) -> bool:
        """Whether the converted model computes what the source did."""
        return False

    def export(self, model, out_dir, opts: dict, dtype=None) -> tuple[list[str], str] | None:
        """Write the patched ``model`` into ``out_dir`` as a native checkpoint of another architecture (its files
        and model class), or None: ``attnzoo convert`` saves it with ``save_pretrained``."""
        return None

    def after_save(self, out_dir, opts: dict) -> list[str]:
        """Changes to side files in the output directory (notes for the table)."""
        return []

    @property
    def option_names(self) -> list[str]:
        return self.config_cls.option_names()

    def options(self, adapter: Adapter, options: dict[str, Any] | PatchConfig) -> dict[str, Any]:
        """Build the typed config from keyword options (or take one), then :meth:`check` it against the
        architecture; returns the options as recorded."""
        config = options if isinstance(options, PatchConfig) else self.config_cls.from_options(**options)
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(config).__name__} is not a config of {self.name!r} "
                            f"(expected {self.config_cls.__name__})")
        return self.check(adapter, config, config.to_dict())

    def check(self, adapter: Adapter, config: PatchConfig, opts: dict[str, Any]) -> dict[str, Any]:
        """Checks of the options against the architecture; returns the options to record."""
        return opts

    def plan(self, site: Site, opts: dict) -> dict:
        raise NotImplementedError  # every converter implements its own

    def is_native(self, adapter: Adapter, sites: list[Site], selected: list[Site], plans: dict, opts: dict) -> bool:
        return False

    def prepare(self, model, adapter: Adapter, sites: list[Site], opts: dict, native: bool) -> dict:
        """Last checks that need the whole model, before anything changes; returns the final options."""
        return opts

    def apply(self, site: Site, plan: dict, opts: dict, native: bool) -> None:
        raise NotImplementedError  # every converter implements its own

    def restore(self, site: Site, plan: dict, opts: dict) -> None:
        raise NotImplementedError  # every converter implements its own

    def finish(self, model, adapter: Adapter, sites: list[Site], plans: dict, opts: dict, native: bool) -> dict:
        return {}

    def patch_own(self, model, options, *, layers=None, filter_fn=None):
        """A model that already holds this variant natively (a DeepSeek-V3 model for ``mla``): patch it the
        variant's own way and return the :class:`~attnzoo.patches.report.PatchReport`. None (the default): not such
        a model, the walker goes on through the adapter table. Called before the adapter lookup."""
        return None


def stream_spec(adapter: Adapter, config: dict) -> StreamSpec:
    """The streaming converter's view of a native checkpoint (from config.json and the adapter row)."""
    from types import SimpleNamespace

    c = SimpleNamespace(**(config.get("text_config") or config))
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


# ---------------------------------------------------------------------------- shared by the methods
def _attn_dropout(adapter: Adapter, config) -> float:
    for name in adapter.attn_dropout:
        p = getattr(config, name, None)
        if p is not None:
            return float(p)
    return 0.0


def build_wrapper(site: Site, w: AttnWeights, kv_heads: int, config_cls=DenseConfig, module_cls=HFDenseAttention,
                  **options) -> HFDenseAttention:
    """The attnzoo module that replaces ``site``'s (weights not set): ``config_cls`` (a ``DenseConfig``, or a
    sparse one with its pattern ``options``) built from the HF module's shapes, RoPE and dropouts."""
    a, config, old = site.adapter, site.config, site.module
    rope = site.rope()
    rope_cfg = RopeConfig(rotary_dim=rope.rotary_dim, base=rope_theta_of(config), style=rope.style) \
        if rope.rotary_dim else False
    o_inside = not a.o_outside
    o_bias = site.o_bias() if o_inside else None
    dcfg = config_cls(dim=w.q.shape[1], heads=w.heads, groups=kv_heads, head_dim=w.head_dim,
                      bias=w.q_bias is not None, out_bias=(o_bias is not None) if o_inside else False,
                      causal=site.causal, rope=rope_cfg, dropout=_attn_dropout(a, config), **options)
    resid = float(getattr(config, a.resid_dropout, 0.0) or 0.0) if a.resid_dropout else 0.0
    new = module_cls(dcfg, layer_idx=getattr(old, "layer_idx", None) or site.layer, hf_config=config,
                     out_dropout=resid, has_o_proj=o_inside)
    dev, dtype = w.q.device, w.q.dtype
    new.to(device=dev)
    for sub in new.children():
        if isinstance(sub, torch.nn.Linear):
            sub.to(dtype=dtype)
    new.train(old.training)
    return new
