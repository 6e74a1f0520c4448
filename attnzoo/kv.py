"""KV-cache accounting: one description of what a layer caches (:class:`KVLayout`), and every byte count
computed from it (:func:`kv_cache_bytes`, :func:`kv_bytes_per_token`, ``PatchReport``, ``attnzoo info``,
``attnzoo eval``, the model card).

A layer's cache holds, per sequence,

* ``per_token`` elements for every token it keeps: keys and values (``2 * kv_heads * head_dim``), or a
  latent (MLA: ``kv_rank + rope_dim``; a native DeepSeek-V2/V3 config is read as such), or both;
* at most ``window`` tokens (a rolling sliding-window cache; None: every token);
* ``state`` elements whatever the length (a linear-attention recurrent state).

Where the layouts come from: an attnzoo variant config says it (``config.kv_layout()``); a Hugging Face
model or config is read from its config (``num_key_value_heads``, ``head_dim``, and per layer the sliding
windows ``transformers``' caches apply) unless attnzoo recorded the layers' layouts in ``config.attnzoo``
(:mod:`attnzoo.patches.record`), which then names the per-token part.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import check_positive_int
from .record import get_record

__all__ = ["KVLayout", "kv_cache_bytes", "kv_bytes_per_token", "kv_layouts", "describe_layouts", "attention_sizes",
           "element_size"]


def element_size(dtype) -> int:
    """Bytes of one element of ``dtype`` (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``)."""
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={name!r}: expected a torch dtype such as 'bfloat16'")
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVLayout:
    """What one attention layer caches for one sequence (see the module docstring)."""

    kv_heads: int = 0
    head_dim: int = 0
    latent: int = 0
    state: int = 0
    window: int | None = None

    @property
    def per_token(self) -> int:
        """Elements cached per kept token."""
        return 2 * self.kv_heads * self.head_dim + self.latent

    def tokens(self, seq_len: int) -> int:
        """Tokens kept after ``seq_len`` tokens."""
        return seq_len if self.window is None else min(seq_len, self.window)

    def elements(self, seq_len: int) -> int:
        return self.per_token * self.tokens(seq_len) + self.state

    def nbytes(self, seq_len: int, dtype=torch.float16) -> int:
        return self.elements(seq_len) * element_size(dtype)

    def with_window(self, window: int | None) -> KVLayout:
        return KVLayout(self.kv_heads, self.head_dim, self.latent, self.state, window)

    def describe(self) -> str:
        """``"K/V 2 x 64"``, ``"latent 576"``, ``"state 4096"``, with ``", last 128 tokens"`` for a window."""
        parts = []
        if self.kv_heads:
            parts.append(f"K/V {self.kv_heads} x {self.head_dim}")
        if self.latent:
            parts.append(f"latent {self.latent}")
        if self.state:
            parts.append(f"state {self.state}")
        text = " + ".join(parts) or "nothing"
        return text + (f", last {self.window} tokens" if self.window is not None else "")

    def to_json(self) -> dict[str, int]:
        """The record in ``config.json`` (only the fields that are set)."""
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_json(cls, obj) -> KVLayout:
        """Inverse of :meth:`to_json`; also reads the older ``[kv_heads, head_dim]`` pairs."""
        if isinstance(obj, (list, tuple)) and len(obj) == 2:
            return cls(kv_heads=int(obj[0]), head_dim=int(obj[1]))
        if isinstance(obj, dict):
            unknown = set(obj) - {"kv_heads", "head_dim", "latent", "state", "window"}
            if not unknown:
                return cls(**{k: (None if v is None else int(v)) for k, v in obj.items()})
        raise ValueError(f"kv_layout entry {obj!r}: expected {{'kv_heads': H, 'head_dim': D, 'latent': L, "
                         "'state': S, 'window': W}} (any subset) or an older [kv_heads, head_dim] pair")


def describe_layouts(layouts) -> str:
    """The layers' layouts in a few words: ``"K/V 2 x 64"`` when every layer caches the same, else
    ``"mixed: ..."`` with each kind once."""
    kinds = sorted({lay.describe() for lay in layouts})
    return kinds[0] if len(kinds) == 1 else "mixed: " + "; ".join(kinds)


def attention_sizes(config: Any) -> dict[str, int]:
    """``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``hidden`` of a transformers config
    (the text/decoder part of composite models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not (heads and hidden and layers):
        raise ValueError(f"{type(config).__name__}: cannot read layers/heads/hidden size from the config")
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {"layers": int(layers), "heads": int(heads), "kv_heads": int(kv), "head_dim": int(head_dim),
            "hidden": int(hidden)}


def _hf_windows(cfg: Any, layers: int) -> list[int | None]:
    """Tokens each decoder layer's cache keeps at most, as ``transformers``' caches keep them: a sliding (or
    chunked) layer of ``sliding_window = S`` the last ``S - 1``, a full layer all (None). All None when
    transformers cannot read the config layer by layer (an older version, or another kind of layer)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        types, kwargs = get_layer_types_and_kwargs(text)
        if isinstance(kwargs, dict):  # transformers < 5.19: one dict for every layer
            kwargs = [kwargs] * len(types)
    except Exception:  # an older transformers, or a config it cannot read layer by layer
        return [None] * layers
    windows = []
    for kind, kw in zip(types, kwargs):
        if kind == "full_attention":
            windows.append(None)
        elif kind in ("sliding_attention", "chunked_attention") and kw.get("sliding_window"):
            windows.append(max(int(kw["sliding_window"]) - 1, 1))
        else:
            return [None] * layers
    return windows if len(windows) == layers else [None] * layers


def _hf_latent_layout(cfg: Any) -> KVLayout | None:
    """The latent layout of a native MLA config (DeepSeek-V2/V3: ``kv_lora_rank`` + ``qk_rope_head_dim`` per token,
    what transformers' cache holds for it), else None."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rank, rope = getattr(text, "kv_lora_rank", None), getattr(text, "qk_rope_head_dim", None)
    if not (isinstance(rank, int) and isinstance(rope, int) and rank > 0 and rope > 0):
        return None
    from .variants.mla import MLAOptions

    return MLAOptions(kv_rank=rank, rope_dim=rope).mla_layout()


def _hf_layouts(cfg: Any) -> list[KVLayout]:
    rec = get_record(cfg)
    if rec is not None and "kv_layout" in rec:
        base = [KVLayout.from_json(x) for x in rec["kv_layout"]]
    elif _hf_latent_layout(cfg) is not None:
        base = [_hf_latent_layout(cfg)] * attention_sizes(cfg)["layers"]
    else:
        f = attention_sizes(cfg)
        base = [KVLayout(f["kv_heads"], f["head_dim"])] * f["layers"]
    windows = _hf_windows(cfg, len(base))
    return [lay if lay.window is not None or w is None else lay.with_window(w) for lay, w in zip(base, windows)]


def _is_hf_config(obj) -> bool:
    return hasattr(obj, "to_dict") and not _is_variant_config(obj)


def _is_variant_config(obj) -> bool:
    from .variants.config import VariantConfig

    return isinstance(obj, VariantConfig)


def kv_layouts(model_or_config: Any) -> list[KVLayout]:
    """One :class:`KVLayout` per attention layer of an attnzoo module or config, or of a Hugging Face model or
    config (patched or not)."""
    if _is_variant_config(model_or_config):
        return [model_or_config.kv_layout()]
    if isinstance(model_or_config, torch.nn.Module):
        hf_config = getattr(model_or_config, "config", None)
        if hf_config is not None and _is_hf_config(hf_config):
            return _hf_layouts(hf_config)
        found = [m.config.kv_layout() for m in model_or_config.modules()
                 if _is_variant_config(getattr(m, "config", None)) and hasattr(m.config, "kv_layout")]
        if found:
            return found
        raise ValueError(f"kv_cache_bytes: {type(model_or_config).__name__} holds no attnzoo attention module "
                         "and has no Hugging Face config")
    if _is_hf_config(model_or_config):
        return _hf_layouts(model_or_config)
    raise TypeError(f"kv_cache_bytes: expected an attnzoo module/config or a Hugging Face model/config, "
                    f"got {type(model_or_config).__name__}")


def _default_dtype(model_or_config: Any, dtype):
    if dtype is not None:
        return dtype
    if isinstance(model_or_config, torch.nn.Module):
        p = next(model_or_config.parameters(), None)
        if p is not None:
            return p.dtype
    if _is_hf_config(model_or_config):
        got = getattr(model_or_config, "dtype", None) or getattr(model_or_config, "torch_dtype", None)
        if got is not None:
            return got
    return torch.float16


def kv_bytes_per_token(model_or_config: Any, dtype=None) -> int:
    """KV-cache bytes one more token costs (batch 1), summed over every attention layer, while no window is
    full (a full window costs nothing more; :func:`kv_cache_bytes` counts that)."""
    return sum(lay.per_token for lay in kv_layouts(model_or_config)) * element_size(
        _default_dtype(model_or_config, dtype))


def kv_cache_bytes(model_or_config: Any, seq_len: int, batch: int = 1, dtype=None) -> int:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens: what the caches really hold.

    ``model_or_config``: an attnzoo module or config, or a Hugging Face model or config.
    ``dtype``: the cache dtype (default: the model's parameter dtype, the config's ``dtype``, else
    float16). A sliding-window layer counts the tokens it keeps (attnzoo's rolling cache keeps ``window``;
    a Hugging Face sliding layer of ``sliding_window = S`` the last ``S - 1``), a latent or recurrent state its
    own size (see :class:`KVLayout`).
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    elem = element_size(_default_dtype(model_or_config, dtype))
    return sum(lay.elements(seq_len) for lay in kv_layouts(model_or_config)) * elem * batch
