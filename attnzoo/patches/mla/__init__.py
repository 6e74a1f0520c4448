"""``mla``: MHA/GQA -> multi-head latent attention for the Llama family (typed config :class:`MLA`, converter
:data:`mla`). The weight maths are pure functions in :mod:`attnzoo.conversion.mla`; the module is
:class:`~attnzoo.variants.mla.MLAAttention` behind :class:`~attnzoo.patches.hf.mla.HFMLAAttention` (the source's
RoPE tables, the latent in ``transformers``' cache); the ``deepseek_v3`` export is :mod:`.deepseek`. On a model that
already is MLA (DeepSeek-V3), ``patch`` converts nothing and gives it absorbed decode
(:func:`~attnzoo.patches.hf.mla.patch_deepseek`).

``attnzoo.patch(model, "mla", kv_rank=..., rope_dim=..., method=...)`` converts every attention layer in place
(calibrating first for the data-aware methods) and records the patch (``save_pretrained`` +
:func:`attnzoo.from_pretrained` restore it). ``attnzoo convert SRC DST --to mla`` runs the same and, where stock
DeepSeek-V3 can express the result (:func:`.deepseek.export_blocker`), writes a plain ``deepseek_v3`` checkpoint
instead (:meth:`MLAConverter.export`).

``kv_rank`` counts the latent numbers a layer caches per token. Where the result can be a ``deepseek_v3``
checkpoint, one of them is the anchor that keeps ``kv_a_layernorm`` harmless
(:func:`attnzoo.conversion.mla.add_anchor`), so ``kv_rank - 1`` carry data; elsewhere the latent has no norm and
all ``kv_rank`` carry data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch

from ...conversion.calibration import CalibrationOptions
from ...conversion.mla import fold_factor, nope_dim_of, rope_pairs_of
from ...errors import UnsupportedArchitectureError, check_choice
from ...options import option
from ...variants.mla import MLAConfig, MLAOptions
from ..config import PatchConfig
from ..converters import Converter
from ..hf.mla import HFMLAAttention, patch_deepseek
from ..sites import get_submodule
from .deepseek import anchored, deepseek_config, deepseek_state_dict, export_blocker, input_norm_bound, \
    save_deepseek_v3
from .layers import METHOD_HELP, METHODS, check_site, convert_site, rope_inv_freq

__all__ = ["MLA", "MLAConverter", "mla", "save_deepseek_v3_model", "NEW_MODULES"]

#: the modules a conversion computes (``uptrain --lora`` trains them fully; o_proj and the MLP keep theirs)
NEW_MODULES = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_CALIB_KEY = "_calibration"  # the calibration pass's statistics, between prepare() and finish() (not recorded)


@dataclass(frozen=True, kw_only=True)
class MLA(MLAOptions, CalibrationOptions, PatchConfig):
    """``attnzoo.MLA(kv_rank=..., rope_dim=...)``: options of ``patch(model, "mla", ...)``."""

    variant: ClassVar[str] = "mla"

    method: str = option("transmla", help="how the latent and rope keys are computed: " + METHOD_HELP)
    anchor_tol: float = option(1e-6, help="deepseek_v3 export: relative error allowed on the latent by the anchor "
                                          "channel that keeps kv_a_layernorm harmless (|c|^2 / 2 beta^2)")

    def validate(self):
        # kv_heads (rope keys per token with rope_keys='per_head') defaults to the source's KV heads here
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MLAOptions)}
        if self.rope_keys == "per_head" and self.kv_heads is None:
            fields["kv_heads"] = 1
        MLAOptions.validate_mla(SimpleNamespace(**fields), None)
        CalibrationOptions.validate(self)
        if self.calib_order != "parallel":
            raise ValueError(f"calib_order={self.calib_order!r}: the mla converter calibrates in one pass over the "
                             "unconverted model; 'sequential' is implemented for the KV-head converters (gqa, mqa): "
                             "use calib_order='parallel'")
        check_choice("method", self.method, tuple(METHODS))
        if self.q_rank is not None:
            raise ValueError(f"q_rank={self.q_rank}: a conversion keeps one q_proj (the queries are not compressed); "
                             "omit q_rank")
        for name in ("nope_dim", "v_dim"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)}: a conversion derives {name} from the model's heads "
                                 "(v_dim = head_dim; nope_dim = head_dim, or head_dim - rotary dims where no rotated "
                                 f"residual is left); omit {name}")
        if not (isinstance(self.anchor_tol, float) and 0 < self.anchor_tol < 1):
            raise ValueError(f"anchor_tol={self.anchor_tol!r}: expected a float in (0, 1)")


class MLAConverter(Converter):
    """Llama-family attention -> MLA (see the package docstring)."""

    name = "mla"
    config_cls = MLA
    native_field = "the deepseek_v3 architecture (config.json `model_type: deepseek_v3`)"
    lossy_note = ("expect quality loss at reduced kv_rank/rope_dim until the model is uptrained (TransMLA and "
                  "MHA2MLA recover most of it with a fraction of a percent of the pre-training tokens).")

    def patch_own(self, model, options, *, layers=None, filter_fn=None):
        """A DeepSeek-V3 model already is MLA: same weights, absorbed decode (nothing converted)."""
        given = options.to_dict() if isinstance(options, PatchConfig) else options
        return patch_deepseek(model, given, layers=layers, filter_fn=filter_fn)

    def check(self, adapter, config, opts):
        if adapter.name not in ("llama", "phi3"):
            raise UnsupportedArchitectureError(
                f"mla conversion serves the Llama family (llama, mistral, qwen2, qwen3, gemma, olmo, phi3: decoder "
                f"layers with RoPE), not {adapter.name!r}")
        return opts

    # ------------------------------------------------------------------ per site
    def _shapes(self, site, opts):
        heads, kv, hd, rd = site.heads, site.kv_heads, site.head_dim, site.rope().rotary_dim
        rope_keys = opts["rope_keys"]
        if rope_keys == "per_head" and opts.get("kv_heads") not in (None, kv):
            raise ValueError(f"kv_heads={opts['kv_heads']}: rope_keys='per_head' keeps one rope key per KV head of "
                             f"the source, which has {kv} at {site.fqn}; omit kv_heads")
        fold_factor(rd, opts["rope_dim"], site.fqn)
        w = site.read()
        q_bias = w.q_bias is not None and bool(w.q_bias.abs().max() > 0)
        blocker = export_blocker(site.config, rope_keys=rope_keys, q_bias=q_bias)
        anchor = blocker is None
        if opts["kv_rank"] < 1 + anchor:
            raise ValueError(f"kv_rank={opts['kv_rank']}: this conversion keeps an anchor channel for "
                             "kv_a_layernorm (a deepseek_v3 checkpoint), so kv_rank must be at least 2")
        return {"layer": site.layer, "heads": heads, "head_dim": hd, "kv_heads_before": kv, "rotary_dim": rd,
                "kv_rank": opts["kv_rank"], "rope_dim": opts["rope_dim"],
                "nope_dim": nope_dim_of(hd, rd, kv, opts["rope_dim"], rope_keys), "v_dim": hd,
                "rope_heads": 1 if rope_keys == "shared" else kv, "q_bias": w.q_bias is not None,
                "latent_norm": anchor, "deepseek": blocker is None, "why_not_deepseek": blocker,
                "rope_pairs": (pairs := rope_pairs_of(rd, opts["rope_dim"])),
                "rope_inv_freq": [float(inv) for inv in rope_inv_freq(site)[pairs]], "mode": "swap"}

    def plan(self, site, opts):
        check_site(site)
        return self._shapes(site, opts)

    def _module(self, site, plan) -> HFMLAAttention:
        config = site.config
        cfg = MLAConfig(dim=site.read().q.shape[1],
                        heads=plan["heads"], kv_rank=plan["kv_rank"], rope_dim=plan["rope_dim"],
                        nope_dim=plan["nope_dim"], v_dim=plan["v_dim"],
                        rope_keys="shared" if plan["rope_heads"] == 1 else "per_head",
                        kv_heads=None if plan["rope_heads"] == 1 else plan["rope_heads"],
                        bias=True, q_bias=plan["q_bias"], causal=True,
                        dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
                        latent_norm=plan["latent_norm"], norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
                        rope_inv_freq=tuple(plan["rope_inv_freq"]))
        old = site.module
        new = HFMLAAttention(cfg, layer_idx=getattr(old, "layer_idx", None) or site.layer, hf_config=config,
                             rope_pairs=plan["rope_pairs"])
        p = next(old.parameters())
        new.to(device=p.device, dtype=p.dtype)
        new.train(old.training)
        return new

    def prepare(self, model, adapter, sites, opts, native):
        opts = dict(opts)
        if METHODS[opts["method"]][1] or METHODS[opts["method"]][2]:
            from ...conversion.calibration import calibrate

            cal = calibrate(model, sites, opts.get("calib"), opts["calib_sequences"], opts["calib_seq_len"],
                            inputs=True)
            opts[_CALIB_KEY] = {fqn: st.input_moment() for fqn, st in cal.layers.items()}
        return opts

    def apply(self, site, plan, opts, native):
        grams = opts.get(_CALIB_KEY) or {}
        anchor = plan["latent_norm"]
        layer = convert_site(site, kv_rank=plan["kv_rank"] - anchor, rope_dim=plan["rope_dim"],
                             rope_keys=opts["rope_keys"], method=opts["method"], gram=grams.get(site.fqn))
        if anchor:
            norm = getattr(get_submodule(site.root, site.parent_path), "input_layernorm", None)
            if norm is None:
                raise UnsupportedArchitectureError(f"{site.parent_path}: no input_layernorm to bound the latent for "
                                                   "the kv_a_layernorm anchor")
            layer, _ = anchored(layer, input_norm_bound(site.config, norm.weight), opts["anchor_tol"])
        w = site.read()
        o_bias = site.o_bias()
        new = self._module(site, plan)
        dtype = w.q.dtype
        with torch.no_grad():
            new.q_proj.weight.copy_(layer.q.to(dtype))
            if new.q_proj.bias is not None:
                new.q_proj.bias.copy_(layer.q_bias.to(dtype))
            new.kv_a_proj_with_mqa.weight.copy_(layer.kv_a.to(dtype))
            new.kv_a_proj_with_mqa.bias.copy_(layer.kv_a_bias.to(dtype))
            if new.kv_a_layernorm is not None:
                new.kv_a_layernorm.weight.fill_(1.0)
            new.kv_b_proj.weight.copy_(layer.kv_b.to(dtype))
            new.o_proj.weight.copy_(w.o)
            new.o_proj.bias.copy_(o_bias if o_bias is not None else torch.zeros_like(new.o_proj.bias))
        setattr(get_submodule(site.root, site.parent_path), site.attr, new)

    def restore(self, site, plan, opts):
        setattr(get_submodule(site.root, site.parent_path), site.attr, self._module(site, plan))

    def finish(self, model, adapter, sites, plans, opts, native):
        from ...checkpoint_io import update_metadata

        opts.pop(_CALIB_KEY, None)
        update_metadata(model, new_modules=list(NEW_MODULES))  # uptrain --lora trains these fully
        blockers = {p.get("why_not_deepseek") for p in plans.values()} - {None}
        if len(plans) == len(sites) and not blockers:
            return {"note": "DeepSeek-V3 can express it: attnzoo convert --to mla writes a plain deepseek_v3 checkpoint "
                            "(from a live model: attnzoo.patches.mla.save_deepseek_v3_model(model, DIR))"}
        if blockers:
            return {"note": f"saved through attnzoo's record (not deepseek_v3): {sorted(blockers)[0]}"}
        return {}

    # ------------------------------------------------------------------ describing and exporting
    def summary(self, opts, config, layouts_before, layouts_after):
        before = sorted({lay.per_token for lay in layouts_before})
        after = sorted({lay.per_token for lay in layouts_after})
        return (f"mla: kv_rank={opts.get('kv_rank')}, rope_dim={opts.get('rope_dim')} "
                f"({opts.get('rope_keys')} rope keys), method={opts.get('method')}; cached numbers per token and "
                f"layer {', '.join(map(str, before))} -> {', '.join(map(str, after))}")

    def exact(self, opts, layouts_before, layouts_after):
        return False  # exact only at full rank with every rope pair kept; the tests show those cases

    def exportable(self, model) -> bool:
        """Whether the patched ``model`` can be written as a stock ``deepseek_v3`` checkpoint."""
        from ...record import get_record

        rec = get_record(model.config)
        if not rec or rec.get("variant") != "mla":
            return False
        plans = list((rec.get("modules") or {}).values())
        from .. import attention_sites

        _, sites = attention_sites(model)
        return len(plans) == len(sites) and all(p.get("deepseek") for p in plans)

    def export(self, model, out_dir, opts, dtype=None):
        """Write the patched ``model`` as a plain ``deepseek_v3`` checkpoint into ``out_dir`` (the files written
        and the class), or None when it cannot be one (then the pipeline saves it with its record)."""
        if not self.exportable(model):
            return None
        return _write_deepseek_v3(model, out_dir, dtype), "DeepseekV3ForCausalLM"


def save_deepseek_v3_model(model, out_dir, dtype=None, force: bool = False) -> list[str]:
    """Save a Llama-family model patched with ``mla`` (every layer, a DeepSeek-expressible conversion) as a plain
    ``deepseek_v3`` checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``out_dir`` is
    written through a temporary directory renamed at the end (an existing one only with ``force``); returns the
    files written."""
    from ...checkpoint_io import atomic_output_dir

    if not mla.exportable(model):
        raise ValueError("save_deepseek_v3_model: the model is not an mla-patched model that DeepSeek-V3 can "
                         "express (see the patch report's note); save it with save_pretrained and reload with "
                         "attnzoo.from_pretrained")
    with atomic_output_dir(out_dir, force=force, option="out_dir") as tmp:
        return _write_deepseek_v3(model, tmp, dtype)


def _write_deepseek_v3(model, out_dir, dtype=None) -> list[str]:
    from ...checkpoint_io import read_metadata
    from ...record import PATCH_KEYS
    from .. import attention_sites

    _, sites = attention_sites(model)
    m = sites[0].module
    config = deepseek_config(model.config, kv_lora_rank=m.kv_rank, nope_dim=m.nope_dim, rope_dim=m.rope_dim,
                             v_dim=m.v_dim, dtype=str(dtype or next(model.parameters()).dtype).replace("torch.", ""))
    # attnzoo's other metadata (pretraining tokens, new_modules for uptraining); no patch record: plain transformers
    config.attnzoo = {k: v for k, v in read_metadata(model.config).items() if k not in PATCH_KEYS}
    return save_deepseek_v3(config, deepseek_state_dict(model, None, dtype), out_dir)


mla = MLAConverter()  # the registry's entry names this
