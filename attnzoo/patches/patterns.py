"""The base of the sparse-pattern converters (``sliding_window/``, ``longformer/``, ``bigbird/``).

One base class, :class:`PatternConverter`; each method's folder adds its typed config and rules. A selected
attention module gets the pattern in one of three ways (``plan["mode"]``):

* ``native``: ``transformers`` has the window itself (``sliding_window`` on mistral and phi3;
  ``layer_types`` on qwen2, qwen3, gemma2): the config is set (``sliding_window = window + 1``,
  see :func:`~attnzoo.patches.hf.kernel.hf_sliding_window`), the checkpoint stays plain
  ``transformers``, and the ``"attnzoo"`` kernel runs the window on the sparse op;
* ``kernel``: the module is kept (an architecture served through ``transformers``' attention
  interface, the llama family) and carries the pattern (``module.attnzoo_pattern``), which the
  ``"attnzoo"`` kernel applies; RoPE (every rope type), q/k norms and caches stay Hugging Face's;
* ``swap``: the module is replaced by :class:`~attnzoo.patches.hf.HFSparseAttention`
  (gpt2, gpt_neox, bert, roberta, vit, clip).

``kernel`` and ``swap`` record the patch in ``config.json``. ``longformer`` and ``bigbird`` are
for bidirectional encoders and can extend the learned position table (``max_positions``, the
Longformer recipe, :mod:`.position_table`); ``global_projections=True`` adds Longformer's
global q/k/v projections, initialised as copies of q/k/v.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import UnsupportedArchitectureError, check_positive_int
from ..options import option
from .config import PatchConfig
from ..ops.sparse import Pattern, SlidingWindow
from ..variants.sparse import SlidingWindowConfig
from .converters import Converter, build_wrapper
from .hf import PATTERN_ATTR, HFSparseAttention, use_attnzoo_kernel
from .position_table import extend_position_tables, position_tables
from .sites import Site, get_submodule, set_linear

__all__ = ["PatternConverter", "PositionsPatch", "NATIVE", "KERNEL", "SWAP"]


@dataclass(frozen=True, kw_only=True)
class PositionsPatch(PatchConfig):
    """The encoder recipes' conversion option (``longformer``, ``bigbird``): how far the learned position table
    grows."""

    max_positions: int | None = option(None, help="extend the learned position table to this many tokens by "
                                                   "copying it (the Longformer recipe)")

    def validate(self):
        check_positive_int("max_positions", self.max_positions, allow_none=True)

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
