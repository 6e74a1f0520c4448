"""The deepseek_v3 export: a converted tiny Llama-family model that plain transformers loads (no remote code)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from attnzoo.patches.mla.deepseek import (anchored, attention_tensors, deepseek_config, deepseek_state_dict,
                                          export_blocker, input_norm_bound, save_deepseek_v3)
from attnzoo.patches.mla.layers import convert_site
from attnzoo.patches.walker import attention_sites

from hf_tiny import VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _model(kind, kv_heads=1, **kw):
    cfg = {"llama": tf.LlamaConfig, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config, "mistral": tf.MistralConfig}[kind]
    cls = {"llama": tf.LlamaForCausalLM, "gemma": tf.GemmaForCausalLM, "phi3": tf.Phi3ForCausalLM,
           "mistral": tf.MistralForCausalLM}[kind]
    torch.manual_seed(0)
    model = cls(cfg(**{**_COMMON, "num_key_value_heads": kv_heads, **kw})).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _export(model, tmp_path, kv_rank, rope_dim, method="svd", tol=1e-6):
    adapter, sites = attention_sites(model)
    attn, shapes = {}, None
    for s in sites:
        layer = convert_site(s, kv_rank=kv_rank, rope_dim=rope_dim, rope_keys="shared", method=method, gram=None)
        norm = s.root.get_submodule(s.parent_path).input_layernorm.weight
        layer, _ = anchored(layer, input_norm_bound(model.config, norm), tol)
        attn[s.layer] = attention_tensors(layer, s.read().o, s.o_bias(), torch.float32)
        shapes = dict(kv_lora_rank=layer.kv_rank, nope_dim=layer.nope_dim, rope_dim=layer.rope_dim, v_dim=layer.v_dim)
    config = deepseek_config(model.config, **shapes)
    save_deepseek_v3(config, deepseek_state_dict(model, attn), tmp_path)
    return tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("kind,kw", [("llama", {"attention_bias": True, "tie_word_embeddings": True}),
                                     ("gemma", {"head_dim": 8}), ("phi3", {}),
                                     ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                                                    "rope_theta": 500000.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 16}})])
def test_mqa_full_rank_export_gives_the_same_logits(kind, kw, tmp_path):
    model = _model(kind, **kw)
    head_dim = kw.get("head_dim", 8)
    dst = _export(model, tmp_path, kv_rank=head_dim, rope_dim=head_dim)
    assert type(dst).__name__ == "DeepseekV3ForCausalLM"
    assert dst.config.kv_lora_rank == head_dim + 1 and dst.config.q_lora_rank is None
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        ref, got = model(ids).logits, dst(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4


def test_gqa_low_rank_export_runs_and_generates(tmp_path):
    model = _model("llama", kv_heads=2)
    dst = _export(model, tmp_path, kv_rank=12, rope_dim=4)
    ids = torch.randint(3, VOCAB, (1, 12))
    out = dst.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    # the stock cache holds the latent (kv_lora_rank) and one rope key (rope_dim) per token
    assert dst.config.kv_lora_rank == 13 and dst.config.qk_rope_head_dim == 4


def test_blockers_name_the_reason():
    q2 = tf.Qwen2Config(**_COMMON)
    assert "bias" in export_blocker(q2, rope_keys="shared", q_bias=True)
    assert "per_head" in export_blocker(tf.LlamaConfig(**_COMMON), rope_keys="per_head", q_bias=False)
    assert "q_norm" in export_blocker(tf.Qwen3Config(**_COMMON), rope_keys="shared", q_bias=False)
    assert export_blocker(tf.LlamaConfig(**_COMMON), rope_keys="shared", q_bias=False) is None
