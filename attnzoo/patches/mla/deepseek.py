"""The ``deepseek_v3`` export of a converted Llama-family model: a plain ``transformers`` checkpoint
(``DeepseekV3ForCausalLM``, no remote code) holding the MLA attention and the source's dense MLP, norms and
embeddings.

The config: ``q_lora_rank: null`` (one ``q_proj``), ``first_k_dense_replace = num_hidden_layers`` and
``n_routed_experts: 0`` (every layer a dense ``DeepseekV3MLP``; the MoE fields are never read),
``num_key_value_heads = num_attention_heads`` (the expanded heads of MLA), ``rope_interleave: false`` (the rope
dims are stored as rotate-half pairs), ``attention_bias: true`` (``kv_a_proj_with_mqa`` carries the anchor of
:func:`attnzoo.conversion.mla.add_anchor` and the source's K/V biases; ``o_proj`` the source's output bias or
zeros), the source's ``rope_parameters`` (theta and scaling), ``rms_norm_eps``, ``hidden_act``,
``tie_word_embeddings``, token ids and ``max_position_embeddings``.

What stock DeepSeek cannot express, and so goes through attnzoo's own record instead (:func:`export_blocker`
says why): a query bias (Qwen2: DeepSeek's ``q_proj`` has none), per-head q/k norms (Qwen3, OLMo 2), a
non-RMS layer norm (OLMo), MLP biases, rope keys per KV head, and RoPE scalings that are not a function of
each frequency alone (only ``default``, ``linear`` and ``llama3`` are).
"""
from __future__ import annotations

import math
import torch

from ...conversion.mla import MLALayer, add_anchor, anchor_beta, latent_norm_bound
from ..adapters import rope_type_of

__all__ = ["DEEPSEEK_ROPE_TYPES", "export_blocker", "anchored", "attention_tensors", "deepseek_config",
           "deepseek_state_dict", "input_norm_bound", "save_deepseek_v3"]

DEEPSEEK_ROPE_TYPES = ("default", "linear", "llama3")
_EXPORTABLE = ("llama", "mistral", "qwen2", "gemma", "phi3")


def export_blocker(config, *, rope_keys: str, q_bias: bool, lm: bool = True) -> str | None:
    """Why the converted model cannot be a stock ``deepseek_v3`` checkpoint (None: it can)."""
    mt = getattr(config, "model_type", "")
    if not lm:
        return "only causal language models become DeepseekV3ForCausalLM"
    if mt not in _EXPORTABLE:
        why = {"qwen3": "per-head q/k norms (q_norm, k_norm)", "olmo": "a non-parametric LayerNorm",
               "gemma2": "logit soft-capping and sandwich norms"}.get(mt, "its layers")
        return f"{mt} has {why}, which DeepSeek-V3 layers do not"
    if rope_keys != "shared":
        return "rope_keys='per_head' (DeepSeek has one rope key shared by every head)"
    if q_bias:
        return "the queries have a bias (DeepSeek-V3's q_proj has none)"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias=True (DeepSeek-V3's MLP has no bias)"
    if rope_type_of(config) not in DEEPSEEK_ROPE_TYPES:
        return (f"rope_type={rope_type_of(config)!r} (kept rope pairs keep their frequencies only for "
                f"{', '.join(DEEPSEEK_ROPE_TYPES)})")
    return None


def input_norm_bound(config, norm_weight: torch.Tensor) -> float:
    """An upper bound of ``|x|`` for the attention input ``x = w * h / rms(h)`` (an RMSNorm's output has norm at most
    ``sqrt(dim) * max|w|``; Gemma's norms multiply by ``1 + w``)."""
    w = norm_weight.detach().double()
    if getattr(config, "model_type", "") == "gemma":
        w = 1.0 + w
    return math.sqrt(w.numel()) * w.abs().max().item()


def anchored(layer: MLALayer, input_bound: float, tol: float = 1e-6) -> tuple[MLALayer, float]:
    """``layer`` with the anchor channel (latent ``kv_rank + 1``) for ``kv_a_layernorm``, and its beta."""
    beta = anchor_beta(latent_norm_bound(layer, input_bound), tol)
    return add_anchor(layer, beta), beta


def attention_tensors(layer: MLALayer, o: torch.Tensor, o_bias: torch.Tensor | None, dtype) -> dict[str, torch.Tensor]:
    """One layer's ``DeepseekV3Attention`` tensors (names relative to ``self_attn``) from an anchored layer."""
    out = {"q_proj.weight": layer.q, "kv_a_proj_with_mqa.weight": layer.kv_a,
           "kv_a_proj_with_mqa.bias": layer.kv_a_bias,
           "kv_a_layernorm.weight": torch.ones(layer.kv_rank, dtype=torch.float64),
           "kv_b_proj.weight": layer.kv_b, "o_proj.weight": o,
           "o_proj.bias": o_bias if o_bias is not None else torch.zeros(o.shape[0])}
    return {k: v.detach().to(dtype=dtype).contiguous() for k, v in out.items()}


def deepseek_config(config, *, kv_lora_rank: int, nope_dim: int, rope_dim: int, v_dim: int, dtype=None):
    """The ``DeepseekV3Config`` of the export (see the module docstring)."""
    from transformers import DeepseekV3Config

    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    rp = dict(getattr(c, "rope_parameters", None) or {})
    rp.setdefault("rope_type", "default")
    if "rope_theta" not in rp:
        rp["rope_theta"] = float(getattr(c, "rope_theta", 10000.0))
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
    out = DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        n_shared_experts=0, n_routed_experts=0, first_k_dense_replace=c.num_hidden_layers, n_group=1, topk_group=1,
        num_experts_per_tok=1, kv_lora_rank=kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim, qk_nope_head_dim=nope_dim, hidden_act=act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)) and c.model_type != "gemma",
        rope_parameters=rp, rope_interleave=False, attention_bias=True,
        attention_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0), num_mtp_layers=0,
    )
    out.architectures = ["DeepseekV3ForCausalLM"]
    if dtype is not None:
        out.dtype = dtype
    return out


def deepseek_state_dict(model, attn: dict[int, dict[str, torch.Tensor]] | None,
                        dtype=None) -> dict[str, torch.Tensor]:
    """The export's tensors: ``attn[layer]`` (from :func:`attention_tensors`; None: the model's own attention
    tensors, an mla-patched model's, already in DeepSeek's names) and the source model's others, renamed
    and adjusted per family (Gemma: norms ``1 + w``, embeddings scaled by ``sqrt(hidden)`` and untied from the
    head; Phi-3: ``gate_up_proj`` split)."""
    config = model.config
    mt = config.model_type
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".self_attn." in name and attn is not None:
            continue
        t = t.detach()
        if mt == "gemma" and name.endswith("norm.weight"):
            t = t.float() + 1.0
        if mt == "phi3" and name.endswith("mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
            continue
        out[name] = t
    if mt == "gemma":
        emb = sd["model.embed_tokens.weight"]
        normalizer = torch.tensor(config.hidden_size ** 0.5, dtype=emb.dtype)
        out["model.embed_tokens.weight"] = emb * normalizer
        out["lm_head.weight"] = emb.detach().clone()
    elif getattr(config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    for layer, tensors in (attn or {}).items():
        for k, v in tensors.items():
            out[f"model.layers.{layer}.self_attn.{k}"] = v
    target = dtype or next(model.parameters()).dtype
    return {k: v.to(target).contiguous() for k, v in out.items()}


def save_deepseek_v3(config, state: dict[str, torch.Tensor], out_dir, max_shard_size: str = "5GB") -> list[str]:
    """Write ``state`` as safetensors shards (with an index when there are several) and ``config`` into
    ``out_dir``; returns the file names written."""
    import json
    from pathlib import Path

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    files = []
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out_dir / filename), metadata={"format": "pt"})
        files.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append("model.safetensors.index.json")
    config.save_pretrained(out_dir)
    return files + ["config.json"]
