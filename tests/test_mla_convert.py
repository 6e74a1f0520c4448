"""attnzoo.patch(model, "mla") on the Llama family and attnzoo convert --to mla (deepseek_v3 or attnzoo's record)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, VOCAB

import attnzoo
from attnzoo.conversion.pipeline import convert_checkpoint
from attnzoo.patches.mla import save_deepseek_v3_model

_MQA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma", "olmo", "phi3"])
def test_full_rank_per_head_rope_keys_is_exact_on_every_family(name):
    """One rope key per KV head, every rope pair and the full latent: the MLA model computes the source's logits."""
    model, inputs = TINY[name].make()
    if name == "mistral":
        inputs["attention_mask"][:] = 1  # MLA keeps no sliding window; the tiny mistral's window is 6 tokens
        inputs = {**inputs, "input_ids": inputs["input_ids"][:, :6], "attention_mask": inputs["attention_mask"][:, :6]}
    ref = _logits(model, inputs)
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // 8
    kv = model.config.num_key_value_heads
    report = attnzoo.patch(model, "mla", kv_rank=2 * kv * hd + 1, rope_dim=hd, rope_keys="per_head", method="svd")
    assert not report.native and len(report.modules) == 2
    torch.testing.assert_close(_logits(model, inputs), ref, atol=1e-4, rtol=1e-4)


def test_qwen3_is_refused_with_the_reason():
    model, _ = TINY["qwen3"].make()
    with pytest.raises(attnzoo.errors.UnsupportedArchitectureError, match="k_norm"):
        attnzoo.patch(model, "mla", kv_rank=16, rope_dim=16, method="svd")


def test_patched_model_saves_reloads_and_decodes(tmp_path):
    model, inputs = TINY["qwen2"].make()  # q bias: not a deepseek_v3 checkpoint, attnzoo's record
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    calib = tmp_path / "calib.ids"
    calib.write_text(" ".join(map(str, torch.randint(3, VOCAB, (200,)).tolist())))
    report = attnzoo.patch(model, "mla", kv_rank=24, rope_dim=4, method="pca", calib=str(calib), calib_sequences=4,
                           calib_seq_len=16)
    assert "record" in " ".join(report.notes)
    ref = _logits(model, inputs)
    model.save_pretrained(tmp_path / "out")
    back = attnzoo.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-5, rtol=1e-5)
    ids = inputs["input_ids"][:1]
    greedy = back.generate(ids, max_new_tokens=8, do_sample=False)
    # the cache computes what a full recomputation does
    full = ids
    for _ in range(8):
        nxt = _logits(back, {"input_ids": full})[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([full, nxt], 1)
    assert torch.equal(greedy, full)
    assert attnzoo.kv.kv_bytes_per_token(back) == 2 * (24 + 4) * 4  # layers x (kv_rank + rope_dim) x fp32
    with torch.no_grad():
        cache = back(ids, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == ids.shape[1] * 2 * (24 + 4) * 4  # what the cache tensors really hold


def test_mqa_full_rank_through_patch_and_deepseek_v3(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_MQA, attention_bias=True)).eval()
    ids = torch.randint(3, VOCAB, (2, 20))
    ref = _logits(model, {"input_ids": ids})
    report = attnzoo.patch(model, "mla", kv_rank=9, rope_dim=8, method="svd")
    assert "deepseek_v3" in " ".join(report.notes)
    torch.testing.assert_close(_logits(model, {"input_ids": ids}), ref, atol=1e-4, rtol=0)
    save_deepseek_v3_model(model, tmp_path / "ds")
    dst = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert type(dst).__name__ == "DeepseekV3ForCausalLM"
    assert (_logits(dst, {"input_ids": ids}) - ref).abs().max().item() <= 1e-4


def test_convert_cli_pipeline_writes_deepseek_v3(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "src"
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**_MQA, "num_key_value_heads": 2})).eval()
    model.save_pretrained(src)
    res = convert_checkpoint(src, tmp_path / "dst", "mla", {"kv_rank": 12, "rope_dim": 4, "method": "svd"},
                             progress=False)
    assert res.native and res.model_class == "DeepseekV3ForCausalLM"
    cfg = tf.AutoConfig.from_pretrained(tmp_path / "dst")
    assert cfg.model_type == "deepseek_v3" and cfg.kv_lora_rank == 12 and cfg.qk_rope_head_dim == 4
    assert attnzoo.record.get_record(cfg) is None  # no patch record: plain transformers
    dst = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.randint(3, VOCAB, (1, 10))
    assert torch.isfinite(_logits(dst, {"input_ids": ids})).all()
    assert (tmp_path / "dst" / "README.md").is_file()
    # attnzoo reads it as MLA, and patch() gives it absorbed decode without converting anything
    assert attnzoo.kv.kv_bytes_per_token(cfg, torch.float32) == 2 * (12 + 4) * 4
    ref = _logits(dst, {"input_ids": ids})
    report = attnzoo.patch(dst, "mla")
    assert report.native and len(report.modules) == 2
    torch.testing.assert_close(_logits(dst, {"input_ids": ids}), ref, atol=1e-5, rtol=1e-5)


def test_bad_options_name_the_valid_ones():
    model, _ = TINY["llama"].make()
    with pytest.raises(ValueError, match="rope_dim=6.*valid"):
        attnzoo.patch(model, "mla", kv_rank=16, rope_dim=6)
    with pytest.raises(ValueError, match="method"):
        attnzoo.patch(model, "mla", kv_rank=16, rope_dim=4, method="mean")
    with pytest.raises(ValueError, match="q_rank"):
        attnzoo.patch(model, "mla", kv_rank=16, rope_dim=4, q_rank=8)


def test_info_mla_rows_follow_the_models_shapes(tmp_path, capsys):
    from attnzoo.cli import main

    d = tmp_path / "smol"  # SmolLM2-135M's attention: 576 wide, 9 heads, 3 KV heads of 64
    tf.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                   intermediate_size=1536, dtype="bfloat16").save_pretrained(d)
    assert main(["info", str(d), "--kv-rank", "512", "--rope-dim", "64"]) == 0
    lines = {ln.split("  ")[0].strip(): ln for ln in capsys.readouterr().out.splitlines()}
    assert "22.5 KiB" in lines["as is (GQA-3)"]  # 30 x 384 x 2 B
    assert "7.03 KiB" in lines["MLA -68.75% (88 latent + 32 rope)"]  # 30 x 120 x 2 B
    assert "2.81 KiB" in lines["MLA -87.50% (32 latent + 16 rope)"]
    assert "33.8 KiB" in lines["MLA (512 latent + 64 rope)"]  # asked for: larger than the model's own cache
