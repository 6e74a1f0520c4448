"""``sliding_window``: keys ``i - window .. i`` (causal) or ``|i - j| <= window``, natively where
``transformers`` has the window (config only, streamed by ``attnzoo convert``), else on attnzoo's sparse kernel
or modules. See :mod:`attnzoo.patches.patterns` for the three ways a module gets a pattern."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from ...conversion.streaming import plan_stream
from ...errors import check_choice
from ...ops import sparse as patterns
from ...options import option
from ...variants.sparse import SlidingWindowConfig, SlidingWindowOptions
from ..config import PatchConfig
from ..converters import StreamJob, stream_spec
from ..hf import hf_sliding_window, use_attnzoo_kernel
from ..patterns import NATIVE, PatternConverter
from ..sites import Site

__all__ = ["SlidingWindow", "SlidingWindowConverter", "set_native_window", "sliding_window"]

_KERNEL_HELP = ("native architectures: 'attnzoo' (the window on attnzoo's sparse kernel) or 'hf' (transformers' "
                "own attention, where it has the window); None: attnzoo")

@dataclass(frozen=True, kw_only=True)
class SlidingWindow(SlidingWindowOptions, PatchConfig):
    """``attnzoo.SlidingWindow(window=256)``: ``patch(model, "sliding_window", window=...)``."""

    variant: ClassVar[str] = "sliding_window"
    kernel: str | None = option(None, help=_KERNEL_HELP)

    def validate(self):
        if self.kernel is not None:
            check_choice("kernel", self.kernel, ("attnzoo", "hf"))


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
    config_cls, module_config_cls, pattern_cls = SlidingWindow, SlidingWindowConfig, patterns.SlidingWindow

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


sliding_window = SlidingWindowConverter()
