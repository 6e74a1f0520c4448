"""KV-cache accounting: :func:`kv_cache_bytes`."""
from __future__ import annotations

from typing import Any

import torch

from .errors import check_positive_int

__all__ = ["kv_cache_bytes", "kv_bytes_per_token", "attention_sizes"]


def _elem(dtype) -> int:
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={name!r}: expected a torch dtype such as 'bfloat16'")
    return torch.empty((), dtype=dtype).element_size()


def _hf_per_token(cfg: Any, dtype) -> int:
    """Bytes/token summed over layers for a Hugging Face config (reads ``num_key_value_heads``).
    Architecture-specific layouts (MLA, patched models) are answered by ``attnzoo.patches``
    when it is installed as a resolver."""
    for resolver in _RESOLVERS:
        got = resolver(cfg, dtype)
        if got is not None:
            return got
    f = attention_sizes(cfg)
    return f["layers"] * 2 * f["kv_heads"] * f["head_dim"] * _elem(dtype)


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


_RESOLVERS: list = []  # callables (config, dtype) -> int | None, registered by higher layers


def _hf_cached_tokens(cfg: Any, seq_len: int) -> list[int] | None:
    """Tokens each decoder layer's cache holds after ``seq_len`` tokens, as ``transformers``' ``DynamicCache``
    keeps them: a sliding (or chunked) layer of window ``S`` the last ``S - 1`` (``min(seq_len, S - 1)``), a full
    layer all ``seq_len``. None when every layer keeps everything, or when a layer is of another kind (linear
    attention, shared KV, ...): the count is then ``seq_len`` per layer, as before. Layers are assumed to take
    equal bytes per token (true for the architectures attnzoo patches)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        types, kwargs = get_layer_types_and_kwargs(text)
        if isinstance(kwargs, dict):  # transformers < 5.19: one dict for every layer
            kwargs = [kwargs] * len(types)
    except Exception:  # an older transformers, or a config it cannot read layer by layer
        return None
    kept = []
    for kind, kw in zip(types, kwargs):
        if kind == "full_attention":
            kept.append(seq_len)
        elif kind in ("sliding_attention", "chunked_attention") and kw.get("sliding_window"):
            kept.append(min(seq_len, max(int(kw["sliding_window"]) - 1, 1)))
        else:
            return None
    return kept if kept and any(k != seq_len for k in kept) else None


def kv_bytes_per_token(model_or_config: Any, dtype=None) -> int:
    """KV-cache bytes per token (batch 1), summed over every attention layer."""
    return _kv_bytes(model_or_config, dtype, None)


def _kv_bytes(model_or_config: Any, dtype, seq_len: int | None) -> int:
    """Bytes for one sequence: per token (``seq_len=None``) or for ``seq_len`` tokens, where an attnzoo
    layer whose config has ``cached_tokens(seq_len)`` (a rolling sliding window) counts those only."""
    from .variants.config import VariantConfig

    def tokens(cfg) -> int:
        if seq_len is None:
            return 1
        return cfg.cached_tokens(seq_len) if hasattr(cfg, "cached_tokens") else seq_len

    def hf(cfg) -> int:
        per_token = _hf_per_token(cfg, dtype)
        kept = _hf_cached_tokens(cfg, seq_len) if seq_len is not None else None
        return per_token * (seq_len or 1) if kept is None else per_token * sum(kept) // len(kept)

    if isinstance(model_or_config, VariantConfig):
        return model_or_config.kv_bytes_per_token(dtype or torch.float16) * tokens(model_or_config)
    if isinstance(model_or_config, torch.nn.Module):
        mods = [m for m in model_or_config.modules()
                if isinstance(getattr(m, "config", None), VariantConfig) and hasattr(m.config, "kv_bytes_per_token")]
        if dtype is None:
            p = next(model_or_config.parameters(), None)
            dtype = p.dtype if p is not None else torch.float16
        hf_config = getattr(model_or_config, "config", None)
        if hf_config is not None and not isinstance(hf_config, VariantConfig):
            return hf(hf_config)  # HF (patched ones: see resolvers)
        if mods:
            return sum(m.config.kv_bytes_per_token(dtype) * tokens(m.config) for m in mods)
        raise ValueError(f"kv_cache_bytes: {type(model_or_config).__name__} holds no attnzoo attention module "
                         "and has no Hugging Face config")
    if hasattr(model_or_config, "to_dict"):  # a transformers PretrainedConfig
        if dtype is None:
            dtype = getattr(model_or_config, "torch_dtype", None) or getattr(model_or_config, "dtype", None)
            dtype = dtype or torch.float16
        return hf(model_or_config)
    raise TypeError(f"kv_cache_bytes: expected an attnzoo module/config or a Hugging Face model/config, "
                    f"got {type(model_or_config).__name__}")


def kv_cache_bytes(model_or_config: Any, seq_len: int, batch: int = 1, dtype=None) -> int:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens.

    ``model_or_config``: an attnzoo module or config, or a Hugging Face model or config.
    ``dtype``: the cache dtype (default: the model's parameter dtype, the config's
    ``torch_dtype``, else float16). A layer whose config has ``cached_tokens(seq_len)`` (a causal
    sliding window keeps ``window`` tokens) counts those tokens only; so does a sliding layer of a
    Hugging Face model (``config.sliding_window = S``, natively or set by attnzoo's patch: the last
    ``S - 1`` tokens, as ``transformers``' ``DynamicCache`` keeps them).
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    return _kv_bytes(model_or_config, dtype, seq_len) * batch
