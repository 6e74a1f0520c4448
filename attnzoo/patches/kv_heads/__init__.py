"""``mha`` / ``gqa`` / ``mqa``: the KV-heads method (typed configs :class:`GQA`, :class:`MQA`, :class:`MHA`
and their converter). The weight maths (mean-pooling, the SVD method) are pure functions in
:mod:`attnzoo.conversion.methods`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...conversion.calibration import CalibrationOptions, calibrate, convert_sequentially, gather_output_moments
from ...conversion.kv_pca import SEQUENTIAL_REFIT_RIDGE, refit_output
from ...conversion.heads import check_groups
from ...conversion.methods import METHODS, check_method, convert_kv_heads
from ...conversion.streaming import plan_stream
from ...errors import UnsupportedArchitectureError, check_choice, check_positive_int
from ...kv import attention_sizes
from ...options import option
from ...variants.dense import GQAOptions, KVHeadsOptions, MHAOptions, MQAOptions
from ..adapters import Adapter
from ..config import PatchConfig
from ..converters import Converter, StreamJob, build_wrapper, stream_spec
from ..hf import use_attnzoo_kernel
from ..sites import get_submodule, set_linear

__all__ = ["KVHeadsPatch", "GQA", "MQA", "MHA", "DenseConverter", "mha", "gqa", "mqa"]


@dataclass(frozen=True, kw_only=True)
class KVHeadsPatch(KVHeadsOptions, CalibrationOptions, PatchConfig):
    """Options of ``patch(model, "gqa" | "mqa" | "mha", ...)`` (``attnzoo.GQA``, ``attnzoo.MQA``, ``attnzoo.MHA``)."""

    method: str | None = option(None, help="how the merged K/V heads are initialised (None: 'pca' when calib is "
                                "given, else 'mean'): " + "; ".join(f"{m.name}: {m.description}"
                                                                      for m in METHODS.values()))
    kernel: str | None = option(None, help="native architectures: 'attnzoo' (attnzoo's fused kernels) or 'hf' "
                                           "(transformers' attention); None: attnzoo where it can serve the model")

    def validate(self):
        check_positive_int("groups", self.groups, allow_none=True)
        if self.method is not None:
            check_method(self.method)
        CalibrationOptions.validate(self)
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
    get :class:`~attnzoo.patches.hf.HFDenseAttention` modules.
    """

    native_field = "`num_key_value_heads`"
    lossy_note = ("expect some quality loss until the model is uptrained (a few percent of the original "
                  "pre-training compute in the GQA paper).")

    def __init__(self, config_cls: type[KVHeadsPatch]):
        self.name, self.config_cls = config_cls.variant, config_cls

    def check(self, adapter, config, opts):
        if opts.get("kernel") == "hf" and not adapter.native:
            raise ValueError(f"kernel='hf' keeps Hugging Face's attention, which only exists where the model "
                             f"keeps its own modules ({adapter.name} modules are replaced by attnzoo's); "
                             "omit kernel or pass kernel='attnzoo'")
        if self.name == "mqa":
            opts["groups"] = 1
        if opts.get("method") is None:  # the best measured method where there is data for it (docs/surgery.md)
            opts["method"] = "pca" if opts.get("calib") is not None else "mean"
        opts.setdefault("kernel", None)
        return opts

    def kv_heads(self, opts: dict, heads: int, kv: int, where: str) -> int:
        """The KV heads the options ask of a layer of ``heads`` query and ``kv`` KV heads (the variant's rule;
        a subclass with another rule overrides this)."""
        return self.config_cls(groups=opts["groups"]).kv_heads_for(heads)

    def target(self, adapter: Adapter, config, opts: dict, heads: int, kv: int, where: str) -> int:
        """The KV heads a layer of ``heads`` query and ``kv`` KV heads gets; every check of a site (live or in a
        checkpoint's config) is here."""
        why = adapter.unsupported(config)
        if why:
            raise UnsupportedArchitectureError(f"{where}: attnzoo cannot reproduce this {adapter.name} attention: "
                                               f"{why}")
        target = self.kv_heads(opts, heads, kv, where)
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
        if not adapter.native or check_method(opts["method"]).calibrated:
            return None  # a calibrated method needs the live model
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
        w2 = opts.get("_converted", {}).get(site.fqn)  # calibrated methods convert in prepare()
        if w2 is None:
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
        reducing = [s for s in sites if self.target(adapter, s.config, opts, s.heads, s.kv_heads, s.fqn) < s.kv_heads]
        method = check_method(opts["method"])
        if method.calibrated and reducing and opts.get("calib_order") == "sequential":
            if not native:
                raise ValueError(f"calib_order='sequential' converts layer by layer in place and needs the native "
                                 f"layout of a whole model ({adapter.name}: every layer selected, one KV-head count "
                                 "for all); use calib_order='parallel'")
            reference = None
            if method.refit_output:  # an unconverted copy: the refit's targets (error-correcting; its docstring)
                from ..walker import attention_sites

                reference = {s.fqn: s for s in attention_sites(copy.deepcopy(model))[1]}
            opts["_converted"] = convert_sequentially(
                model, reducing, opts["calib"], opts["calib_sequences"], opts["calib_seq_len"],
                mixed_values=method.mixed_values, reference_sites=reference,
                convert=lambda s, st: convert_kv_heads(s.read(), self.plan(s, opts)["kv_heads"], method.name,
                                                       s.rope(), where=s.fqn, stats=st),
                refit=(lambda s, w, cross, gram: refit_output(w, s.read(), cross, gram, ridge=SEQUENTIAL_REFIT_RIDGE))
                if method.refit_output
                else None,
                write=lambda s, w: s.write_native(w))
        elif method.calibrated and reducing:
            # passes over the unconverted model, then every site's weights; handed to apply() and dropped in
            # finish() (never recorded)
            cal = calibrate(model, reducing, opts["calib"], opts["calib_sequences"], opts["calib_seq_len"],
                            mixed_values=method.mixed_values)
            opts["_converted"] = {s.fqn: convert_kv_heads(s.read(), self.plan(s, opts)["kv_heads"], method.name,
                                                          s.rope(), where=s.fqn, stats=cal.of(s.fqn))
                                  for s in reducing}
            if method.refit_output:  # second pass, same data, every layer fed by the unconverted model
                moments = gather_output_moments(model, reducing, cal.ids, opts["_converted"])
                opts["_converted"] = {s.fqn: refit_output(opts["_converted"][s.fqn], s.read(), *moments[s.fqn])
                                      for s in reducing}
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
        opts.pop("_converted", None)
        if native:
            kv = next(iter(plans.values()))["kv_heads"]
            for cfg in {id(s.config): s.config for s in sites}.values():
                cfg.num_key_value_heads = kv
        if adapter.native and opts["kernel"] == "attnzoo":
            use_attnzoo_kernel(model)
        return {"kernel": opts["kernel"]}


mha, gqa, mqa = DenseConverter(MHA), DenseConverter(GQA), DenseConverter(MQA)  # the registry's entries name these
