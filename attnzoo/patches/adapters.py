"""The adapter table: where each Hugging Face architecture keeps its attention, and how.

One :class:`Adapter` row per architecture family; no per-model code. A row says

* which ``config.model_type`` values it serves,
* where the attention modules are (``towers``: a regex on the module's qualified name per
  tower, with the layer index as group ``layer``, and whether that tower is causal),
* how q/k/v are stored (``layout``, see :mod:`attnzoo.conversion.layouts`) and named, and
  where the output projection is (``o``; ``"../output.dense"`` means a sibling module),
* whether the architecture has ``num_key_value_heads`` (``native``: the converted model
  stays a plain ``transformers`` model) or its modules get replaced by attnzoo's,
* whether ``transformers`` has a sliding window for it (``window_native``: ``"model"``, one
  ``config.sliding_window`` for every layer; ``"layers"``, per layer through ``config.layer_types``),
* where its learned absolute position table is (``positions``, for the Longformer recipe),
* how RoPE reaches the module (``rope``; the KV cache's keyword is found by :mod:`attnzoo.hf_compat`), its dropouts,
  and which config options attnzoo cannot reproduce (``unsupported``).

Adding an architecture is adding a row (and a tiny config to the tests).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..conversion.heads import RopeSpec
from ..errors import UnsupportedArchitectureError

__all__ = ["Tower", "Adapter", "ADAPTERS", "adapter_for", "supported_model_types", "rope_spec_of",
           "rotary_dim_of"]


@dataclass(frozen=True)
class Tower:
    """Attention modules whose qualified name ends with ``pattern`` (``(?P<layer>\\d+)`` captures the
    layer index). ``causal``: None reads the HF module's ``is_causal``."""

    pattern: str
    causal: bool | None = None

    def match(self, fqn: str) -> int | None:
        m = re.search(r"(?:^|\.)" + self.pattern + r"$", fqn)
        return int(m.group("layer")) if m else None


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def rotary_dim_of(config, head_dim: int) -> int:
    """Rotated dims per head from a config (``partial_rotary_factor`` in ``rope_parameters`` or top level)."""
    rp = getattr(config, "rope_parameters", None) or {}
    factor = rp.get("partial_rotary_factor") if isinstance(rp, dict) else None
    factor = factor if factor is not None else _cfg(config, "partial_rotary_factor", "rotary_pct", default=1.0)
    return int(head_dim * factor)


def rope_theta_of(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else _cfg(config, "rope_theta", "rotary_emb_base", default=10000.0))


def rope_type_of(config) -> str:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (rp.get("rope_type") or rp.get("type") or "default") if isinstance(rp, dict) else "default"


def _rotary(config, head_dim):
    return RopeSpec(rotary_dim_of(config, head_dim), "half")


def _no_rope(config, head_dim):
    return RopeSpec()


# ------------------------------------------------------------------ config checks (None = fine)
def _llama_linear_keys(config) -> str | None:
    if getattr(config, "model_type", "") in ("qwen3", "olmo2", "qwen3_moe"):
        return f"{config.model_type} normalises keys per head (k_norm)"
    if getattr(config, "clip_qkv", None) is not None:
        return f"clip_qkv={config.clip_qkv} clamps the projections"
    return None


def _llama_kernel(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None):
        return f"attn_logit_softcapping={config.attn_logit_softcapping} (attnzoo kernels have no soft-capping)"
    return None


def _gpt2_unsupported(config) -> str | None:
    if not getattr(config, "scale_attn_weights", True):
        return "scale_attn_weights=False"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "scale_attn_by_inverse_layer_idx=True"
    if getattr(config, "reorder_and_upcast_attn", False):
        return "reorder_and_upcast_attn=True"
    return None


def _neox_unsupported(config) -> str | None:
    if rope_type_of(config) != "default":
        return f"rope_type={rope_type_of(config)!r} (only default rotary embeddings)"
    return None


def _llama_window(config) -> str | None:
    """How transformers gives this model type a sliding window (None: it does not)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "mistral":
        return "model"  # MistralConfig.sliding_window, every layer
    if model_type in ("qwen2", "qwen3", "gemma2"):
        return "layers"  # layer_types[i] == "sliding_attention" uses config.sliding_window
    return None


def _bert_unsupported(config) -> str | None:
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        return f"position_embedding_type={pet!r} (relative position scores)"
    return None


@dataclass(frozen=True)
class Adapter:
    """One architecture family. See the module docstring for the fields."""

    name: str
    model_types: tuple[str, ...]
    towers: tuple[Tower, ...]
    layout: str = "separate"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    native: bool = False
    rope: Callable[[Any, int], RopeSpec] = _no_rope
    attn_dropout: tuple[str, ...] = ("attention_dropout",)
    resid_dropout: str | None = None
    unsupported: Callable[[Any], str | None] = lambda config: None
    linear_keys: Callable[[Any], str | None] = lambda config: None
    kernel_block: Callable[[Any], str | None] = lambda config: None
    window_native: Callable[[Any], str | None] = lambda config: None
    positions: str | None = None
    note: str = ""
    examples: tuple[str, ...] = field(default=())

    @property
    def o_outside(self) -> bool:
        """The output projection lives outside the attention module (BERT's ``attention.output.dense``)."""
        return self.o.startswith("../")

    def tower_of(self, fqn: str) -> tuple[Tower, int] | None:
        for t in self.towers:
            layer = t.match(fqn)
            if layer is not None:
                return t, layer
        return None


_LLAMA_TOWER = (Tower(r"layers\.(?P<layer>\d+)\.self_attn"),)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo"), _LLAMA_TOWER,
            native=True, rope=_rotary, linear_keys=_llama_linear_keys, kernel_block=_llama_kernel,
            window_native=_llama_window, note="num_key_value_heads; RoPE and HF caches untouched",
            examples=("Llama 2/3", "Mistral", "Qwen2/2.5", "Qwen3", "Gemma", "Gemma 2", "OLMo")),
    Adapter("phi3", ("phi3",), _LLAMA_TOWER, layout="concat", qkv="qkv_proj", native=True, rope=_rotary,
            kernel_block=_llama_kernel, window_native=lambda config: "model", note="fused qkv_proj rows [q; k; v]",
            examples=("Phi-3", "Phi-3.5")),
    Adapter("gpt_neox", ("gpt_neox",), (Tower(r"layers\.(?P<layer>\d+)\.attention", causal=True),),
            layout="interleaved", qkv="query_key_value", o="dense", rope=_rotary,
            unsupported=_neox_unsupported, note="fused query_key_value interleaved per head; partial rotary",
            examples=("Pythia", "GPT-NeoX-20B")),
    Adapter("gpt2", ("gpt2",), (Tower(r"h\.(?P<layer>\d+)\.attn", causal=True),), layout="conv1d", qkv="c_attn",
            o="c_proj", attn_dropout=("attn_pdrop",), resid_dropout="resid_pdrop",
            unsupported=_gpt2_unsupported, note="Conv1D c_attn (transposed, [q|k|v]); learned positions",
            examples=("GPT-2",)),
    Adapter("bert", ("bert", "roberta"), (Tower(r"layer\.(?P<layer>\d+)\.attention\.self"),), q="query", k="key",
            v="value", o="../output.dense",
            attn_dropout=("attention_probs_dropout_prob",), unsupported=_bert_unsupported,
            positions=r"embeddings\.position_embeddings",
            note="encoder; output projection in the sibling attention.output.dense",
            examples=("BERT", "RoBERTa")),
    Adapter("vit", ("vit",), (Tower(r"layers?\.(?P<layer>\d+)\.attention", causal=False),),
            attn_dropout=("attention_probs_dropout_prob",), note="vision encoder", examples=("ViT",)),
    Adapter("clip", ("clip", "clip_text_model", "clip_vision_model"),
            (Tower(r"text_model\.encoder\.layers\.(?P<layer>\d+)\.self_attn", causal=True),
             Tower(r"vision_model\.encoder\.layers\.(?P<layer>\d+)\.self_attn", causal=False)),
            o="out_proj", note="text tower (causal) and vision tower", examples=("CLIP",)),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config) -> Adapter:
    """The adapter serving a model or config (by ``model_type``), else ``UnsupportedArchitectureError``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(config, dict):
        model_type = config.get("model_type")
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    what = type(model_or_config).__name__
    raise UnsupportedArchitectureError(
        f"attnzoo has no adapter for model_type={model_type!r} ({what}). Supported model types: "
        f"{', '.join(supported_model_types())}")


def rope_spec_of(adapter: Adapter, config, head_dim: int) -> RopeSpec:
    return adapter.rope(config, head_dim)
