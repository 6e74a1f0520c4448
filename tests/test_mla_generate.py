"""MLA inside Hugging Face ``generate()``: the latent cache in transformers' cache objects, absorbed decode for native
DeepSeek-V3 models (:func:`attnzoo.patches.hf.mla.absorb_deepseek_attention`), and :class:`HFMLAAttention` in a
Llama decoder layer (the wrapper converted models use)."""
import copy

import pytest
import torch
import transformers as tf

import attnzoo
from attnzoo.patches.hf.mla import HFMLAAttention, absorb_deepseek_attention
from attnzoo.variants.mla import MLAConfig

from test_mla import _deepseek_config

STEPS = 32


def _deepseek(q_rank=None):
    torch.manual_seed(0)
    model = tf.DeepseekV3ForCausalLM(_deepseek_config(q_rank, layers=2)).eval()
    for name, p in model.named_parameters():  # larger attention weights than the init: a sharper test
        if "self_attn" in name and name.endswith("weight") and "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _prompt():
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _greedy(model, ids, mask, use_cache):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("q_rank", [None, 12])
def test_deepseek_v3_gets_absorbed_decode_with_the_same_logits(q_rank):
    hf = _deepseek(q_rank)
    ours = copy.deepcopy(hf)
    names = absorb_deepseek_attention(ours)
    assert len(names) == 2 and all(isinstance(ours.get_submodule(n), HFMLAAttention) for n in names)
    assert ours.state_dict().keys() == hf.state_dict().keys()  # a plain deepseek_v3 checkpoint, as before
    ids, mask = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[1, 2:],
                                   hf(input_ids=ids, attention_mask=mask).logits[1, 2:], rtol=1e-5, atol=1e-5)
        want = _greedy(hf, ids, mask, use_cache=False)  # full recomputation, transformers' own attention
        calls = []
        hook = ours.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
        got = _greedy(ours, ids, mask, use_cache=True)
        hook.remove()
    assert torch.equal(got, want)
    assert len(calls) == 1 and calls[0][1] == 7  # kv_b_proj ran once, on the prompt: decode never expands the cache


def test_the_cache_holds_exactly_the_latent_and_the_rope_key():
    model = _deepseek()
    absorb_deepseek_attention(model)
    ids, mask = _prompt()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = attnzoo.hf_compat.output_cache(out)
        for _ in range(3):  # three decode steps through the same cache
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{
                attnzoo.hf_compat.model_cache_kwarg(model): cache})
    seq, layers, elem = 7 + 3, 2, 4
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert sum(t.numel() * t.element_size() for t in tensors) == layers * (8 + 4) * elem * 2 * seq
    assert [tuple(t.shape) for t in tensors[:2]] == [(2, 1, seq, 8), (2, 1, seq, 4)]
    cfg = model.config
    assert attnzoo.kv_cache_bytes(MLAConfig(dim=32, heads=4, kv_rank=cfg.kv_lora_rank, rope_dim=4, nope_dim=6,
                                            v_dim=5), seq_len=seq, batch=2, dtype=torch.float32) * layers == \
        sum(t.numel() * t.element_size() for t in tensors)


def test_hf_mla_attention_in_a_llama_layer_generates_as_full_recomputation():
    """The wrapper converted models use: MLA modules (own RoPE frequencies, per-KV-head rope keys) in a Llama
    decoder; generate() with the latent cache = without any cache, 32 greedy tokens in float32."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    for i, layer in enumerate(model.model.layers):
        mcfg = MLAConfig(dim=32, heads=4, kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8, causal=True,
                         rope_keys="per_head", kv_heads=2, latent_norm=False, rope_inv_freq=(1.0, 0.01))
        layer.self_attn = HFMLAAttention(mcfg, layer_idx=i, hf_config=cfg)
        for p in layer.self_attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
    ids, mask = _prompt()
    with torch.no_grad():
        want = _greedy(model, ids, mask, use_cache=False)
        got = _greedy(model, ids, mask, use_cache=True)
    assert torch.equal(got, want)
    assert want.shape == (2, 7 + STEPS)


def test_rope_pairs_take_the_layers_own_table_columns():
    """rope_pairs=[0, 2] of a Llama layer (head_dim 8, theta 10000) turns the rope dims as the module's own
    frequencies 10000^(-2i/8), i = 0, 2 do."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    a = tf.LlamaForCausalLM(cfg).eval()
    mcfg = dict(dim=32, heads=4, kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8, causal=True)
    a.model.layers[0].self_attn = HFMLAAttention(MLAConfig(**mcfg), layer_idx=0, rope_pairs=[0, 2])
    b = copy.deepcopy(a)
    b.model.layers[0].self_attn = HFMLAAttention(MLAConfig(**mcfg, rope_inv_freq=(1.0, 10000 ** -0.5)), layer_idx=0)
    b.model.layers[0].self_attn.load_state_dict(a.model.layers[0].self_attn.state_dict())
    ids, mask = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids, attention_mask=mask).logits[1, 2:],
                                   b(input_ids=ids, attention_mask=mask).logits[1, 2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rope_pairs"):
        HFMLAAttention(MLAConfig(**mcfg), layer_idx=0, rope_pairs=[0])


def test_yarn_deepseek_keeps_its_rope_tables_and_softmax_scale():
    """A YaRN DeepSeek-V3 (mscale in the softmax scale and in the cos/sin tables): same logits after the swap."""
    cfg = _deepseek_config()
    cfg.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                           "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                           "beta_slow": 1}
    torch.manual_seed(0)
    hf = tf.DeepseekV3ForCausalLM(cfg).eval()
    ours = copy.deepcopy(hf)
    absorb_deepseek_attention(ours)
    assert ours.model.layers[0].self_attn.config.scale == pytest.approx(hf.model.layers[0].self_attn.scaling)
    ids = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_patch_mla_on_a_deepseek_model_takes_the_native_path(monkeypatch):
    """attnzoo.patch(deepseek_v3_model, "mla"): the walker lets the converter take over a model that already is MLA
    (Converter.patch_own); here a converter that does only that, as the mla converter's patch_own does."""
    import dataclasses

    from attnzoo import registry
    from attnzoo.patches.converters import Converter
    from attnzoo.patches.hf.mla import patch_deepseek

    class Own(Converter):
        name = "mla"

        def patch_own(self, model, options, **selection):
            return patch_deepseek(model, options, **selection)

    monkeypatch.setitem(registry._REGISTRY, "mla", dataclasses.replace(registry.get("mla"), converter_ref=Own()))
    hf = _deepseek()
    ours = copy.deepcopy(hf)
    report = attnzoo.patch(ours, "mla")
    assert report.native and report.architecture == "deepseek_v3" and len(report.modules) == 2
    assert report.kv_bytes_per_token_before == report.kv_bytes_per_token_after == 2 * (8 + 4) * 4
    ids, mask = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[1, 2:],
                                   hf(input_ids=ids, attention_mask=mask).logits[1, 2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_rank=16: this deepseek_v3 model already is MLA with kv_rank=8"):
        attnzoo.patch(copy.deepcopy(hf), "mla", kv_rank=16)
    one = copy.deepcopy(hf)
    assert attnzoo.patch(one, "mla", layers=[1]).modules == ["model.layers.1.self_attn"]
    assert not isinstance(one.model.layers[0].self_attn, HFMLAAttention)


def test_a_sliding_window_cache_keeps_its_window_of_latents():
    """MLA modules in a Mistral decoder with sliding_window=6 (transformers keeps the last 5 positions per layer):
    generate() with the cache = without, past the window."""
    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.MistralForCausalLM(cfg).eval()
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = HFMLAAttention(MLAConfig(dim=32, heads=4, kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8,
                                                   causal=True), layer_idx=i, hf_config=cfg, rope_pairs=[0, 1])
        for p in layer.self_attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
        got = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
        cache = attnzoo.hf_compat.output_cache(model(input_ids=ids, use_cache=True))
    assert torch.equal(got, want)
    assert tuple(cache.layers[0].keys.shape) == (2, 1, 5, 8)  # the window of latents, nothing more
