"""``performer``, ``linear``, ``linformer``: the linear family put into Hugging Face models (typed configs
:class:`Performer`, :class:`Linear`, :class:`Linformer` and their converter).

Every architecture of the adapter table gets its attention modules *replaced* (``swap``): the llama family too,
since a fixed-size state cannot live in ``transformers``' own attention modules, whose caches keep every key.
q/k/v/o weights are reused as they are; the feature maps start at their initial values (the identity, or
random orthogonal rows) and Linformer's sequence projections at random (``N(0, 1/k)``): train them with
``attnzoo uptrain --stage transfer`` (attention transfer), then LoRA / distillation. The module's score
``scale`` is the HF module's own (``scaling``: Gemma's ``query_pre_attn_scalar``), so the window and FAVOR+
stand for the softmax the model was trained with. Architectures that normalise queries/keys per head
(qwen3, olmo2) or soft-cap logits (gemma2) are refused: the replacement would drop that.

Causal models: ``config.sliding_window`` is cleared (the linear layers read every earlier token; a window is the
``linear`` variant's ``window``), so that ``generate()`` builds plain dynamic caches, in which the state lives
(:mod:`.hf`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import UnsupportedArchitectureError, check_type
from ...options import option
from ...variants.linear import (_LINFORMER_CAUSAL, LinearConfig, LinearOptions, LinformerConfig, LinformerOptions,
                                PerformerConfig, PerformerOptions)
from ..config import PatchConfig
from ..converters import Converter, build_wrapper
from ..sites import get_submodule, set_linear
from .hf import HFLinearAttention, HFLinformerAttention, HFStateView

__all__ = ["Performer", "Linear", "Linformer", "LinearConverter", "performer", "linear", "linformer",
           "HFLinearAttention", "HFLinformerAttention", "HFStateView"]


@dataclass(frozen=True, kw_only=True)
class Performer(PerformerOptions, PatchConfig):
    """``attnzoo.Performer(features=256, seed=0, redraw=0)``: ``patch(model, "performer", ...)``."""

    variant: ClassVar[str] = "performer"


@dataclass(frozen=True, kw_only=True)
class Linear(LinearOptions, PatchConfig):
    """``attnzoo.Linear(feature_map="hedgehog", window=64)``: ``patch(model, "linear", ...)``."""

    variant: ClassVar[str] = "linear"


@dataclass(frozen=True, kw_only=True)
class Linformer(LinformerOptions, PatchConfig):
    """``attnzoo.Linformer(k=256, max_len=512)``: ``patch(model, "linformer", ...)`` (encoders)."""

    variant: ClassVar[str] = "linformer"
    share_layers: bool = option(False, help="one pair of projections for every layer (the paper's layer-wise "
                                            "sharing)")

    def validate(self):
        check_type("share_layers", self.share_layers, bool, "True or False")


class LinearConverter(Converter):
    """Replaces the selected attention modules by the variant's (see the module docstring)."""

    lossy_note = ("linear attention changes the model's outputs: run attention transfer (`attnzoo uptrain --stage "
                  "transfer`) and then LoRA or distillation to recover quality.")

    def __init__(self, config_cls, module_config_cls, module_cls, patch_only=()):
        self.name, self.config_cls = config_cls.variant, config_cls
        self.module_config_cls, self.module_cls, self.patch_only = module_config_cls, module_cls, patch_only

    def check(self, adapter, config, opts):
        self._module_config(opts, causal=False, dim=8, heads=1, scale=None, probe=True)  # option checks, no model
        return opts

    def _module_config(self, opts, *, causal, probe=False, **dense):
        own = {k: v for k, v in opts.items() if k not in self.patch_only}
        if self.module_config_cls is LinformerConfig:
            return LinformerConfig(**own, **dense)
        if probe and self.module_config_cls is LinearConfig and own.get("window"):
            causal = True  # a window's causality is checked per site
        return self.module_config_cls(**own, causal=causal, **dense)

    def plan(self, site, opts):
        a, m = site.adapter, site.module
        why = a.unsupported(site.config) or a.kernel_block(site.config)
        if why:
            raise UnsupportedArchitectureError(f"{site.fqn}: attnzoo cannot reproduce this {a.name} attention: {why}")
        if any(getattr(m, name, None) is not None for name in ("q_norm", "k_norm")):
            raise UnsupportedArchitectureError(f"{site.fqn}: {getattr(site.config, 'model_type', a.name)} normalises "
                                               "queries/keys per head (q_norm/k_norm), which the linear family's "
                                               "modules do not reproduce")
        if self.name == "linformer" and site.causal:
            raise ValueError(f"patch(model, 'linformer'): {site.fqn} is causal ({a.name}); {_LINFORMER_CAUSAL}")
        if opts.get("window") and not site.causal:
            raise ValueError(f"window={opts['window']}: {site.fqn} is not causal ({a.name}), and the softmax window "
                             "is the last `window` keys of a causal layer; use window=0 for encoders")
        scale = getattr(m, "scaling", None)
        return {"layer": site.layer, "heads": site.heads, "head_dim": site.head_dim, "kv_heads_before": site.kv_heads,
                "kv_heads": site.kv_heads, "causal": site.causal, "mode": "swap",
                "scale": float(scale) if isinstance(scale, (int, float)) else None}

    def _wrapper(self, site, w, plan, opts):
        own = {k: v for k, v in opts.items() if k not in self.patch_only and k != "kernel"}

        def config_cls(**dense):
            if self.module_config_cls is LinformerConfig:
                dense.pop("causal")
            return self.module_config_cls(**dense)

        new = build_wrapper(site, w, plan["kv_heads"], config_cls, self.module_cls, scale=plan["scale"], **own)
        dtype = w.q.dtype
        for sub in (getattr(new, "q_feature_map", None), getattr(new, "k_feature_map", None)):
            if sub is not None:
                sub.to(dtype=dtype)
        return new

    def apply(self, site, plan, opts, native):
        w = site.read()
        new = self._wrapper(site, w, plan, opts)
        with torch.no_grad():
            for name, wt, b in (("q_proj", w.q, w.q_bias), ("k_proj", w.k, w.k_bias), ("v_proj", w.v, w.v_bias)):
                set_linear(new, name, wt, b)
            if not site.adapter.o_outside:
                set_linear(new, "o_proj", w.o, site.o_bias())
        setattr(get_submodule(site.root, site.parent_path), site.attr, new)

    def restore(self, site, plan, opts):
        new = self._wrapper(site, site.read(), plan, opts)
        setattr(get_submodule(site.root, site.parent_path), site.attr, new)

    def prepare(self, model, adapter, sites, opts, native):
        """Linformer: ``max_len`` None becomes the model's ``max_position_embeddings``."""
        opts = dict(opts)
        if "max_len" in opts and opts["max_len"] is None:
            n = getattr(sites[0].config, "max_position_embeddings", None)
            opts["max_len"] = int(n) if n else None
        return opts

    def finish(self, model, adapter, sites, plans, opts, native):
        notes = []
        if opts.get("share_layers"):
            mods = [get_submodule(model, fqn) for fqn in plans]
            for m in mods[1:]:
                m.share_projections_with(mods[0])
            notes.append(f"one pair of sequence projections shared by {len(mods)} layers")
        if self.name == "linear":  # the LoRA stage trains the feature maps fully (uptrain's default --train-fully)
            from ...checkpoint_io import read_metadata, update_metadata

            names = read_metadata(model).get("new_modules") or []
            update_metadata(model, new_modules=list(dict.fromkeys([*names, "q_feature_map", "k_feature_map"])))
        if any(p["causal"] for p in plans.values()):
            for cfg in {id(s.config): s.config for s in sites}.values():
                if getattr(cfg, "sliding_window", None) is not None:
                    cfg.sliding_window = None
                    notes.append("config.sliding_window cleared: the linear layers read every earlier token")
                if getattr(cfg, "layer_types", None):
                    cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
            notes.append("generate() keeps a fixed-size state per layer" + (
                f" plus the last {opts['window']} tokens' keys/values" if opts.get("window") else ""))
        return {"note": "; ".join(dict.fromkeys(notes))} if notes else {}

    def summary(self, opts, config, layouts_before, layouts_after):
        shown = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None and v is not False)
        return f"{self.name}: {shown}"


performer = LinearConverter(Performer, PerformerConfig, HFLinearAttention)
linear = LinearConverter(Linear, LinearConfig, HFLinearAttention)
linformer = LinearConverter(Linformer, LinformerConfig, HFLinformerAttention, patch_only=("share_layers",))
