"""Converters for the sparse patterns: ``sliding_window``, ``longformer``, ``bigbird``.

One base class, :class:`PatternConverter`; each variant adds its options. A selected
attention module gets the pattern in one of three ways (``plan["mode"]``):

* ``native``: ``transformers`` has the window itself (``sliding_window`` on mistral and phi3;
  ``layer_types`` on qwen2, qwen3, gemma2): the config is set (``sliding_window = window + 1``,
  see :func:`~attnzoo.patches.kernel.hf_sliding_window`), the checkpoint stays plain
  ``transformers``, and the ``"attnzoo"`` kernel runs the window on the sparse op;
* ``kernel``: the module is kept (an architecture served through ``transformers``' attention
  interface, the llama family) and carries the pattern (``module.attnzoo_pattern``), which the
  ``"attnzoo"`` kernel applies; RoPE (every rope type), q/k norms and caches stay Hugging Face's;
* ``swap``: the module is replaced by :class:`~attnzoo.patches.wrapper.HFSparseAttention`
  (gpt2, gpt_neox, bert, roberta, vit, clip).

``kernel`` and ``swap`` record the patch in ``config.json``. ``longformer`` and ``bigbird`` are
for bidirectional encoders and can extend the learned position table (``max_positions``, the
Longformer recipe, :mod:`.position_table`); ``global_projections=True`` adds Longformer's
global q/k/v projections, initialised as copies of q/k/v.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UnsupportedArchitectureError, check_choice, check_positive_int, check_type
from ..ops.sparse import BigBird, Longformer, Pattern, SlidingWindow
from ..options import option
from ..variants.sparse import (BigBirdConfig, BigBirdOptions, LongformerConfig, LongformerOptions, SlidingWindowConfig,
                               SlidingWindowOptions)
from ..conversion.streaming import plan_stream
from .config import PatchConfig
from .converters import Converter, StreamJob, build_wrapper, register_converter
from .kernel import PATTERN_ATTR, hf_sliding_window, use_attnzoo_kernel
from .position_table import extend_position_tables, position_tables
from .sites import Site, get_submodule, set_linear
from .wrapper import HFSparseAttention

__all__ = ["SlidingWindowPatch", "LongformerPatch", "BigBirdPatch", "PatternConverter", "SlidingWindowConverter", "LongformerConverter", "BigBirdConverter",
           "set_native_window", "NATIVE", "KERNEL", "SWAP"]

NATIVE, KERNEL, SWAP = "native", "kernel", "swap"


class PatternConverter(Converter):
    """Base of the sparse-pattern converters; see the module docstring."""

    module_config_cls: type = SlidingWindowConfig
    pattern_cls: type = SlidingWindow
    bidirectional_only = False  # longformer, bigbird: encoders only
    native_field = "`sliding_window`"
    lossy_note = ("a pattern that drops keys the model used changes its outputs until it is uptrained (the "
                  "Longformer paper continues pre-training after the conversion).")

    def summary(self, opts, config, layouts_before, layouts_after):
        shown = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None and v is not False and k != "kernel")
        return f"{self.name}: {shown}"

    def after_save(self, out_dir, opts):
        """``max_positions`` also becomes the tokenizer's ``model_max_length``."""
        n = opts.get("max_positions")
        f = out_dir / "tokenizer_config.json"
        if n is None or not f.is_file():
            return []
        try:
            tok = json.loads(f.read_text())
        except json.JSONDecodeError:
            return []
        if not isinstance(tok, dict) or "model_max_length" not in tok:
            return []
        old, tok["model_max_length"] = tok["model_max_length"], n
        f.write_text(json.dumps(tok, indent=2) + "\n")
        return [f"tokenizer_config.json: model_max_length {old} -> {n}"]

    # ------------------------------------------------------------------ options
    def check(self, adapter, config, opts):
        if isinstance(opts.get("global_tokens"), range):
            opts["global_tokens"] = list(opts["global_tokens"])  # JSON-able in the record
        self.pattern(opts, causal=False)  # checks the pattern's options (ValueError/TypeError naming them)
        return opts

    def pattern_options(self, opts) -> dict:
        return {k: opts[k] for k in self.pattern_cls.__dataclass_fields__ if k in opts and k != "causal"}

    def module_options(self, opts) -> dict:
        """The options of ``config_cls`` besides the dense ones (the pattern's, and e.g. global projections)."""
        return self.pattern_options(opts)

    def pattern(self, opts, causal: bool) -> Pattern:
        return self.pattern_cls(causal=causal, **self.pattern_options(opts))

    # ------------------------------------------------------------------ protocol
    def plan(self, site, opts):
        a = site.adapter
        why = a.unsupported(site.config)
        if why:
            raise UnsupportedArchitectureError(f"{site.fqn}: attnzoo cannot reproduce this {a.name} attention: {why}")
        if self.bidirectional_only and site.causal:
            raise ValueError(f"patch(model, {self.name!r}): {site.fqn} is causal ({a.name}), and {self.name} is a "
                             f"recipe for bidirectional encoders (bert, roberta; vit and clip's vision tower too); "
                             f"for decoders use patch(model, 'sliding_window', window=...)")
        if site.causal:
            self.pattern(opts, causal=True)
        kv = site.kv_heads
        return {"layer": site.layer, "heads": site.heads, "head_dim": site.head_dim, "kv_heads_before": kv,
                "kv_heads": kv, "causal": site.causal, "mode": KERNEL if a.native else SWAP}

    def prepare(self, model, adapter, sites, opts, native):
        opts = dict(opts)
        if opts.get("max_positions") is not None:
            table = position_tables(model, adapter)[0]
            if opts["max_positions"] < table.capacity:
                raise ValueError(f"max_positions={opts['max_positions']}: smaller than the {table.capacity} positions "
                                 f"{type(model).__name__} already has ({table.fqn}: {table.rows} rows"
                                 + (f", {table.offset} reserved" if table.offset else "") + "); the Longformer recipe "
                                 f"extends, it never truncates: expected max_positions >= {table.capacity}")
        if "kernel" in self.option_names:
            opts["kernel"] = opts.get("kernel") or "attnzoo"
        return opts

    def apply(self, site, plan, opts, native):
        if plan["mode"] == KERNEL:
            setattr(site.module, PATTERN_ATTR, self.pattern(opts, plan["causal"]))
            return
        if plan["mode"] == NATIVE:
            self.apply_native(site, opts)
            return
        w = site.read()
        new = self._wrapper(site, w, plan, opts)
        with torch.no_grad():
            for name, wt, b in (("q_proj", w.q, w.q_bias), ("k_proj", w.k, w.k_bias), ("v_proj", w.v, w.v_bias)):
                set_linear(new, name, wt, b)
                if getattr(new, "global_projections", False):  # Longformer: copies of q/k/v
                    set_linear(new, name.replace("_proj", "_global_proj"), wt, b)
            if not site.adapter.o_outside:
                set_linear(new, "o_proj", w.o, site.o_bias())
        setattr(get_submodule(site.root, site.parent_path), site.attr, new)

    def restore(self, site, plan, opts):
        if plan["mode"] == KERNEL:
            setattr(site.module, PATTERN_ATTR, self.pattern(opts, plan["causal"]))
        elif plan["mode"] == SWAP:
            new = self._wrapper(site, site.read(), plan, opts)
            setattr(get_submodule(site.root, site.parent_path), site.attr, new)
        else:
            raise ValueError(f"{site.fqn}: a native {self.name} patch has no record to restore")

    def apply_native(self, site: Site, opts) -> None:
        raise ValueError(f"{self.name} has no native form")  # only sliding_window sets native plans

    def finish(self, model, adapter, sites, plans, opts, native):
        notes = []
        if any(p["mode"] == KERNEL for p in plans.values()):
            use_attnzoo_kernel(model)
        if opts.get("max_positions") is not None:
            notes += extend_position_tables(model, adapter, opts["max_positions"])
        return {"note": "; ".join(notes)} if notes else {}

    def _wrapper(self, site, w, plan, opts):
        return build_wrapper(site, w, plan["kv_heads"], self.module_config_cls, HFSparseAttention,
                             **self.module_options(opts))


# ---------------------------------------------------------------------------- typed configs
_KERNEL_HELP = ("native architectures: 'attnzoo' (the window on attnzoo's sparse kernel) or 'hf' (transformers' "
                "own attention, where it has the window); None: attnzoo")
_MAX_POSITIONS_HELP = "extend the learned position table to this many tokens by copying it (the Longformer recipe)"


@dataclass(frozen=True, kw_only=True)
class SlidingWindowPatch(SlidingWindowOptions, PatchConfig):
    """``attnzoo.SlidingWindow(window=256)``: ``patch(model, "sliding_window", window=...)``."""

    variant: ClassVar[str] = "sliding_window"
    kernel: str | None = option(None, help=_KERNEL_HELP)

    def validate(self):
        if self.kernel is not None:
            check_choice("kernel", self.kernel, ("attnzoo", "hf"))


@dataclass(frozen=True, kw_only=True)
class LongformerPatch(LongformerOptions, PatchConfig):
    """``attnzoo.Longformer(window=256, global_tokens=1, max_positions=None, global_projections=False)``."""

    variant: ClassVar[str] = "longformer"
    max_positions: int | None = option(None, help=_MAX_POSITIONS_HELP)

    def validate(self):
        check_type("global_projections", self.global_projections, bool, "True or False")
        check_positive_int("max_positions", self.max_positions, allow_none=True)


@dataclass(frozen=True, kw_only=True)
class BigBirdPatch(BigBirdOptions, PatchConfig):
    """``attnzoo.BigBird(block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0, max_positions=None)``."""

    variant: ClassVar[str] = "bigbird"
    max_positions: int | None = option(None, help=_MAX_POSITIONS_HELP)

    def validate(self):
        check_positive_int("max_positions", self.max_positions, allow_none=True)


# ---------------------------------------------------------------------------- sliding_window
def _set_if_present(obj, name: str, value) -> None:
    if hasattr(obj, name):
        setattr(obj, name, value)


def set_native_window(config, window: int, style: str, layers: set[int] | None = None) -> None:
    """Give a ``transformers`` config attnzoo's causal ``window`` natively (``sliding_window = window + 1``):
    ``style="model"`` (mistral, phi3: every layer) or ``"layers"`` (qwen2, qwen3, gemma2: ``layers``, default
    all, become ``"sliding_attention"`` in ``layer_types``). Used by ``patch`` and by ``attnzoo convert``."""
    config.sliding_window = hf_sliding_window(window)
    if style != "layers":
        return
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    config.layer_types = ["sliding_attention" if layers is None or i in layers else t for i, t in enumerate(types)]
    _set_if_present(config, "use_sliding_window", True)
    first = config.layer_types.index("sliding_attention")
    if all(t == "sliding_attention" for t in config.layer_types[first:]):
        _set_if_present(config, "max_window_layers", first)  # qwen2/qwen3: layers >= max_window_layers slide


class SlidingWindowConverter(PatternConverter):
    """``patch(model, "sliding_window", window=W)``: keys ``i - W .. i`` (causal) or ``|i - j| <= W``."""

    name = "sliding_window"
    config_cls, module_config_cls, pattern_cls = SlidingWindowPatch, SlidingWindowConfig, SlidingWindow

    @staticmethod
    def _style(adapter, site: Site) -> str | None:
        return adapter.window_native(site.config) if adapter.native and site.causal else None

    def is_native(self, adapter, sites, selected, plans, opts):
        style = self._style(adapter, sites[0])
        if style == "layers" or (style == "model" and len(selected) == len(sites)):
            for p in plans.values():
                p["mode"] = NATIVE
            return True
        return False

    def prepare(self, model, adapter, sites, opts, native):
        given = opts.get("kernel")
        opts = super().prepare(model, adapter, sites, opts, native)
        config = sites[0].config
        model_type = getattr(config, "model_type", "?")
        style = self._style(adapter, sites[0])
        current = getattr(config, "sliding_window", None)
        if native:
            blocked = adapter.kernel_block(config)
            if blocked:
                if given == "attnzoo":
                    raise ValueError(f"kernel='attnzoo' cannot serve this model: {blocked}; use kernel='hf'")
                opts["kernel"] = "hf"
                opts["kernel_note"] = f"kept Hugging Face's attention: {blocked}"
            if style == "layers" and current is not None and current != hf_sliding_window(opts["window"]):
                chosen = {s.layer for s in sites}
                others = [i for i, t in enumerate(getattr(config, "layer_types", None) or [])
                          if t == "sliding_attention" and i not in chosen]
                if others:
                    raise ValueError(f"window={opts['window']}: {model_type} has one sliding_window for all its "
                                     f"sliding layers (config.sliding_window={current}, i.e. window={current - 1}, "
                                     f"on layers {others}, which are not selected); select them too or use "
                                     f"window={current - 1}")
            return opts
        if given == "hf":
            raise ValueError(f"kernel='hf' keeps Hugging Face's attention, which has no sliding window here "
                             f"({model_type}" + (", not every layer selected" if style == "model" else "")
                             + "); omit kernel (attnzoo's kernel applies the window)")
        if style == "model" and current is not None:
            raise ValueError(f"{model_type} has one sliding_window for every layer (config.sliding_window={current}); "
                             f"a window on some layers only cannot be expressed: patch every layer (omit layers and "
                             f"filter_fn)")
        blocked = adapter.kernel_block(config) if adapter.native else None
        if blocked:
            raise ValueError(f"patch(model, 'sliding_window') runs the window in attnzoo's kernel, which cannot "
                             f"serve this model: {blocked}")
        return opts

    def stream(self, source, config, adapter, opts, dtype):
        """A native window changes config.json only: every tensor is copied as is."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        style = adapter.window_native(text) if adapter.native else None
        if style is None:
            return None
        from .converters import stream_spec

        spec = stream_spec(adapter, source.config)
        plan = plan_stream(source, spec, spec.kv_heads, "mean", dtype)  # nothing to rewrite: every tensor copied
        out = copy.deepcopy(config)
        out_text = out.get_text_config() if hasattr(out, "get_text_config") else out
        before = getattr(text, "sliding_window", None)
        set_native_window(out_text, opts["window"], style)
        s = out_text.sliding_window
        notes = [f"native: config.sliding_window={s} (transformers keeps {s} keys, the query's own included); "
                 "every tensor copied as is (streamed)"]
        rows = [{"tensors": "config.json: sliding_window", "count": 1, "shape before": str(before),
                 "shape after": str(s), "dtype": "-"}]
        return StreamJob(self, opts, plan, out, notes, rows)

    def apply_native(self, site, opts):
        m = site.module
        _set_if_present(m, "sliding_window", hf_sliding_window(opts["window"]))
        _set_if_present(m, "layer_type", "sliding_attention")

    def finish(self, model, adapter, sites, plans, opts, native):
        info = super().finish(model, adapter, sites, plans, opts, native)
        notes = [info["note"]] if info.get("note") else []
        s = hf_sliding_window(opts["window"])
        configs = {id(x.config): x.config for x in sites}.values()
        if native:
            chosen = {p["layer"] for p in plans.values()}
            for cfg in configs:
                set_native_window(cfg, opts["window"], self._style(adapter, sites[0]), chosen)
            for m in model.modules():
                _set_if_present(m, "has_sliding_layers", True)
            if opts["kernel"] == "attnzoo":
                use_attnzoo_kernel(model)
            notes.append(f"native: config.sliding_window={s} (transformers keeps {s} keys, the query's own "
                         f"included: attnzoo's window={opts['window']}); generate() caches at most {s - 1} tokens "
                         "per sliding layer")
        elif len(plans) == len(sites) and all(p["causal"] for p in plans.values()):
            for cfg in configs:
                cfg.sliding_window = s  # transformers' DynamicCache(config) then keeps the last s - 1 tokens
            notes.append(f"config.sliding_window={s} so that generate() caches at most {s - 1} tokens per layer "
                         "(transformers' sliding-window cache)")
        return {"note": "; ".join(notes)} if notes else {}


# ---------------------------------------------------------------------------- longformer, bigbird
class LongformerConverter(PatternConverter):
    """``patch(model, "longformer", window=W, global_tokens=1, max_positions=None, global_projections=False)``."""

    name = "longformer"
    config_cls, module_config_cls, pattern_cls = LongformerPatch, LongformerConfig, Longformer
    bidirectional_only = True

    def module_options(self, opts):
        return {**super().module_options(opts), "global_projections": opts["global_projections"]}


class BigBirdConverter(PatternConverter):
    """``patch(model, "bigbird", block_size=64, window=None, global_blocks=2, random_blocks=3, seed=0,
    max_positions=None)``."""

    name = "bigbird"
    config_cls, module_config_cls, pattern_cls = BigBirdPatch, BigBirdConfig, BigBird
    bidirectional_only = True

    def check(self, adapter, config, opts):
        opts = super().check(adapter, config, opts)
        opts["window"] = self.pattern(opts, causal=False).window  # None -> block_size
        return opts

    def prepare(self, model, adapter, sites, opts, native):
        opts = super().prepare(model, adapter, sites, opts, native)
        n = opts.get("max_positions")
        if n is None and adapter.positions:
            n = position_tables(model, adapter)[0].capacity
        if n is not None:
            where = "max_positions" if opts.get("max_positions") is not None else "the model's positions"
            try:
                self.pattern(opts, causal=False).check(n)
            except ValueError as e:
                raise ValueError(f"{e} [checked at {where} = {n} tokens, the longest input this model takes]") from None
        return opts


for _converter in (SlidingWindowConverter(), LongformerConverter(), BigBirdConverter()):
    register_converter(_converter)
