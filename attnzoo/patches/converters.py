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

``attnzoo convert`` (:mod:`attnzoo.patches.checkpoint`) runs the same protocol through ``patch`` on a loaded
model, unless ``stream(...)`` returns a :class:`StreamJob`: a conversion of the checkpoint's tensors shard by
shard, without building the model. ``summary``, ``exact``, ``after_save``, ``native_field`` and
``lossy_note`` describe the result (the table at the end of ``attnzoo convert``, the model card).

A later variant is one more subclass registered with :func:`register_converter`; the walker
does not change. The sparse patterns (``sliding_window``, ``longformer``, ``bigbird``) are in
:mod:`attnzoo.patches.pattern_converters`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..conversion.heads import AttnWeights, check_groups
from ..conversion.methods import METHODS, check_method, convert_kv_heads
from ..conversion.streaming import StreamPlan, StreamSpec, plan_stream
from ..kv import KVLayout, attention_sizes
from ..errors import UnknownVariantError, UnsupportedArchitectureError, check_choice, check_positive_int, suggest
from ..variants.config import RopeConfig
from ..options import option
from ..variants.dense import DenseConfig, GQAOptions, KVHeadsOptions, MHAOptions, MQAOptions
from .adapters import Adapter, rope_spec_of, rope_theta_of
from .config import PatchConfig
from .kernel import use_attnzoo_kernel
from .sites import Site, get_submodule, set_linear
from .wrapper import HFDenseAttention

__all__ = ["GQA", "MQA", "MHA", "Converter", "StreamJob", "DenseConverter", "CONVERTERS", "register_converter", "get_converter",
           "build_wrapper", "stream_spec"]

CONVERTERS: dict[str, Converter] = {}


def register_converter(converter: Converter) -> Converter:
    if converter.name in CONVERTERS:
        raise ValueError(f"a converter for {converter.name!r} is already registered")
    CONVERTERS[converter.name] = converter
    return converter


def get_converter(name: str) -> Converter:
    if not isinstance(name, str):
        raise TypeError(f"name={name!r}: expected a variant name (str) such as 'gqa'")
    if name not in CONVERTERS:
        from ..registry import list_variants

        known = list_variants()
        if name in known:
            raise UnsupportedArchitectureError(
                f"variant {name!r} is registered but patch() has no converter for it yet; "
                f"patch() converts to: {', '.join(sorted(CONVERTERS))}")
        raise UnknownVariantError(f"unknown variant {name!r}.{suggest(name, sorted(CONVERTERS))} "
                                  f"patch() converts to: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[name]


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


# ---------------------------------------------------------------------------- dense family
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


@dataclass(frozen=True, kw_only=True)
class KVHeadsPatch(KVHeadsOptions, PatchConfig):
    """Options of ``patch(model, "gqa" | "mqa" | "mha", ...)`` (``attnzoo.GQA``, ``attnzoo.MQA``, ``attnzoo.MHA``)."""

    method: str = option("mean", help="how the merged K/V heads are initialised: "
                         + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    kernel: str | None = option(None, help="native architectures: 'attnzoo' (attnzoo's fused kernels) or 'hf' "
                                           "(transformers' attention); None: attnzoo where it can serve the model")

    def validate(self):
        check_positive_int("groups", self.groups, allow_none=True)
        check_method(self.method)
        if self.kernel is not None:
            check_choice("kernel", self.kernel, ("attnzoo", "hf"))
        self.kv_heads_for(None)  # the variant's rule on groups, as far as it needs no model


@dataclass(frozen=True, kw_only=True)
class MHA(MHAOptions, KVHeadsPatch):
    """``attnzoo.MHA()``: one KV head per query head (expands grouped heads by copying; exact)."""

    variant: ClassVar[str] = "mha"


@dataclass(frozen=True, kw_only=True)
class GQA(GQAOptions, KVHeadsPatch):
    """``attnzoo.GQA(groups=8)``: ``groups`` KV heads per layer."""

    variant: ClassVar[str] = "gqa"


@dataclass(frozen=True, kw_only=True)
class MQA(MQAOptions, KVHeadsPatch):
    """``attnzoo.MQA()``: one KV head per layer."""

    variant: ClassVar[str] = "mqa"


class DenseConverter(Converter):
    """``mha`` / ``gqa`` / ``mqa``: leave ``groups`` KV heads per layer.

    Native checkpoints are converted by streaming (only the K/V projections and, for some methods, Q and O are
    rewritten; ``num_key_value_heads`` in config.json).

    Native architectures keep their HF modules (k/v projections resized, ``num_key_value_heads``
    updated) and get attnzoo's kernel through ``transformers``' attention interface; the others
    get :class:`~attnzoo.patches.wrapper.HFDenseAttention` modules.
    """

    native_field = "`num_key_value_heads`"
    lossy_note = ("expect some quality loss until the model is uptrained (a few percent of the original "
                  "pre-training compute in the GQA paper).")

    def __init__(self, config_cls: type[KVHeadsPatch]):
        self.name, self.config_cls = config_cls.variant, config_cls

    def check(self, adapter, config, opts):
        if opts["kernel"] == "hf" and not adapter.native:
            raise ValueError(f"kernel='hf' keeps Hugging Face's attention, which only exists where the model "
                             f"keeps its own modules ({adapter.name} modules are replaced by attnzoo's); "
                             "omit kernel or pass kernel='attnzoo'")
        if self.name == "mqa":
            opts["groups"] = 1
        return opts

    def target(self, adapter: Adapter, config, opts: dict, heads: int, kv: int, where: str) -> int:
        """The KV heads a layer of ``heads`` query and ``kv`` KV heads gets; every check of a site (live or in a
        checkpoint's config) is here."""
        why = adapter.unsupported(config)
        if why:
            raise UnsupportedArchitectureError(f"{where}: attnzoo cannot reproduce this {adapter.name} attention: "
                                               f"{why}")
        target = self.config_cls(groups=opts["groups"]).kv_heads_for(heads)
        check_groups(target, heads, kv, where)
        method = check_method(opts["method"])
        if target < kv and method.linear_keys:
            why = adapter.linear_keys(config)
            if why:
                raise ValueError(f"method={method.name!r} folds a per-head correction into the queries, which needs "
                                 f"keys that reach the scores linearly, but {why}; use method='mean'")
        return target

    def plan(self, site, opts):
        heads, kv, hd = site.heads, site.kv_heads, site.head_dim
        target = self.target(site.adapter, site.config, opts, heads, kv, site.fqn)
        return {"layer": site.layer, "heads": heads, "head_dim": hd, "kv_heads_before": kv, "kv_heads": target,
                "mode": "native" if site.adapter.native else "swap"}

    def stream(self, source, config, adapter, opts, dtype):
        if not adapter.native:
            return None
        spec = stream_spec(adapter, source.config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        target = self.target(adapter, text, opts, spec.heads, spec.kv_heads, str(source.path))
        plan = plan_stream(source, spec, target, opts["method"], dtype)
        out = copy.deepcopy(config)
        (out.get_text_config() if hasattr(out, "get_text_config") else out).num_key_value_heads = target
        return StreamJob(self, opts, plan, out)

    def summary(self, opts, config, layouts_before, layouts_after):
        heads = attention_sizes(config)["heads"]
        before = ", ".join(map(str, sorted({lay.kv_heads for lay in layouts_before})))
        after = ", ".join(map(str, sorted({lay.kv_heads for lay in layouts_after})))
        return (f"{self.name}: {heads} query heads, KV heads {before} -> {after}, "
                f"method={opts.get('method', 'mean')}")

    def exact(self, opts, layouts_before, layouts_after):
        return all(a.kv_heads >= b.kv_heads for a, b in zip(layouts_after, layouts_before))

    def is_native(self, adapter, sites, selected, plans, opts):
        if not adapter.native or len(selected) != len(sites):
            return False
        return len({p["kv_heads"] for p in plans.values()}) == 1

    def apply(self, site, plan, opts, native):
        w = site.read()
        w2 = convert_kv_heads(w, plan["kv_heads"], opts["method"], site.rope(), where=site.fqn)
        if site.adapter.native:
            site.write_native(w2)
            return
        new = build_wrapper(site, w, plan["kv_heads"])
        with torch.no_grad():
            for name, wt, b in (("q_proj", w2.q, w2.q_bias), ("k_proj", w2.k, w2.k_bias), ("v_proj", w2.v, w2.v_bias)):
                set_linear(new, name, wt, b)
            if site.adapter.o_outside:
                if w2.o is not w.o:
                    get_submodule(site.root, site.o_path()).weight.copy_(w2.o)
            else:
                set_linear(new, "o_proj", w2.o, site.o_bias())
        parent = get_submodule(site.root, site.parent_path)
        setattr(parent, site.attr, new)

    def restore(self, site, plan, opts):
        if site.adapter.native:
            site.resize_native(plan["kv_heads"])
            return
        new = build_wrapper(site, site.read(), plan["kv_heads"])
        setattr(get_submodule(site.root, site.parent_path), site.attr, new)

    def prepare(self, model, adapter, sites, opts, native):
        opts = dict(opts)
        if not adapter.native:
            opts["kernel"] = "attnzoo"  # the replacement modules are attnzoo's
            return opts
        blocked = adapter.kernel_block(sites[0].config)
        if opts.get("kernel") == "attnzoo" and blocked:
            raise ValueError(f"kernel='attnzoo' cannot serve this model: {blocked}; use kernel='hf'")
        if opts.get("kernel") is None:
            opts["kernel"] = "hf" if blocked else "attnzoo"
            opts["kernel_note"] = f"kept Hugging Face's attention: {blocked}" if blocked else None
        return opts

    def finish(self, model, adapter, sites, plans, opts, native):
        if native:
            kv = next(iter(plans.values()))["kv_heads"]
            for cfg in {id(s.config): s.config for s in sites}.values():
                cfg.num_key_value_heads = kv
        if adapter.native and opts["kernel"] == "attnzoo":
            use_attnzoo_kernel(model)
        return {"kernel": opts["kernel"]}


for _cls in (MHA, GQA, MQA):
    register_converter(DenseConverter(_cls))
