"""The ``mla`` module: options, the KV layout, equality with transformers' DeepSeek-V3 attention, both paths."""
import pytest
import torch

import attnzoo
from attnzoo.kv import KVLayout
from attnzoo.variants.mla import MLAConfig

from oracle import mla_reference

SHAPE = dict(dim=32, heads=4, kv_rank=8, rope_dim=4, nope_dim=6, v_dim=5)


def _deepseek_config(q_rank=None, interleave=True, layers=2, bias=False):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=8,
                            q_lora_rank=q_rank, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5,
                            first_k_dense_replace=layers, n_routed_experts=1, n_group=1, topk_group=1,
                            num_experts_per_tok=1, rope_interleave=interleave, attention_bias=bias,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_options_are_checked_with_their_names():
    with pytest.raises(ValueError, match="rope_dim=5"):
        MLAConfig(**{**SHAPE, "rope_dim": 5})
    with pytest.raises(ValueError, match="rope_keys"):
        MLAConfig(**SHAPE, rope_keys="each")
    with pytest.raises(ValueError, match="needs kv_heads"):
        MLAConfig(**SHAPE, rope_keys="per_head")
    with pytest.raises(ValueError, match="kv_heads=3: must divide heads=4"):
        MLAConfig(**SHAPE, rope_keys="per_head", kv_heads=3)
    with pytest.raises(ValueError, match="rope_keys='shared'"):
        MLAConfig(**SHAPE, kv_heads=2)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        MLAConfig(**SHAPE, rope_inv_freq=(1.0,))


def test_kv_layout_is_the_latent_and_the_rope_keys():
    assert MLAConfig(**SHAPE).kv_layout() == KVLayout(latent=8 + 4)
    assert MLAConfig(**SHAPE, rope_keys="per_head", kv_heads=2).kv_layout() == KVLayout(latent=8 + 2 * 4)
    big = MLAConfig(dim=7168, heads=128, kv_rank=512, rope_dim=64, nope_dim=128, v_dim=128, q_rank=1536)
    assert attnzoo.kv_cache_bytes(big, seq_len=1, dtype=torch.bfloat16) == 576 * 2


@pytest.mark.parametrize("q_rank", [None, 12])
@pytest.mark.parametrize("interleave", [True, False])
def test_equals_transformers_deepseek_v3_attention(q_rank, interleave):
    """Same weights (the state dict loads strictly, names one to one), same output in float32."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                      DeepseekV3RotaryEmbedding)

    cfg = _deepseek_config(q_rank, interleave, bias=q_rank is not None)
    cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(cfg, layer_idx=0).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = attnzoo.create("mla", **SHAPE, q_rank=q_rank, causal=True, rope_interleave=interleave,
                          bias=q_rank is not None).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 11, 32)
    pos = torch.arange(11)[None].expand(2, -1)
    cos, sin = DeepseekV3RotaryEmbedding(cfg)(x, pos)
    causal = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    want, _ = hf(x, position_embeddings=(cos, sin), attention_mask=causal)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)  # the module's own RoPE
    torch.testing.assert_close(ours(x, position_embeddings=(cos, sin)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(), dict(rope_keys="per_head", kv_heads=2, q_rank=8, rope_interleave=True),
                                  dict(latent_norm=False, scale=0.3, rope_inv_freq=(0.9, 0.05))])
def test_matches_the_float64_oracle(opts):
    m = attnzoo.create("mla", **SHAPE, **opts, causal=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, :2] = False
    torch.testing.assert_close(m(x, key_padding_mask=kpm), mla_reference(m, x, key_padding_mask=kpm),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("opts", [dict(), dict(rope_keys="per_head", kv_heads=2)])
def test_decoding_from_the_latent_cache_equals_the_full_forward(opts):
    """Prefill (expanded) then token by token (absorbed over the cache) = one causal forward; the cache holds
    exactly kv_rank + rope keys per token."""
    m = attnzoo.create("mla", **SHAPE, **opts, causal=True).double().eval()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    full = m(x)
    cache = m.make_cache()
    outs = [m(x[:, :4], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seq_len == 10 and cache.layout() == m.config.kv_layout()
    c, r = cache.get()
    assert c.shape == (2, 10, 8) and r.shape == (2, 10, m.config.rope_heads * 4)


def test_dense_op_serves_a_value_head_dim_unlike_the_query_one():
    """MLA's prefill: q/k head dim nope + rope, v head dim v_dim, grouped heads, causal, forward and backward on
    every CPU backend (the flash kernel runs it zero-padded to one head dim); no backend's refusal is taken for a
    grouped-heads one."""
    from attnzoo.ops import attention, attention_reference, explain
    from attnzoo.ops.dense.backends import SDPABackend

    SDPABackend._gqa_cache.pop(("sdpa_flash", "cpu"), None)  # a per-process memo: judge this test's calls only
    q, k, v = (torch.randn(2, 4, 5, 24), torch.randn(2, 2, 7, 24), torch.randn(2, 2, 7, 16))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = attention_reference(q64, k64, v64, causal=True)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), g)
    for name in ("sdpa_flash", "sdpa_math", "eager"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, causal=True, backend=name)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out, (qq, kk, vv), g.float()), want_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="flex").double(), want, rtol=1e-5, atol=1e-5)
    assert explain(q, k, v, causal=True).backend == "sdpa_flash"
    assert SDPABackend._gqa_cache.get(("sdpa_flash", "cpu"), True)


def test_a_deepseek_config_is_counted_as_its_latent_cache():
    """kv_cache_bytes of a native DeepSeek-V3 config: kv_lora_rank + qk_rope_head_dim per token and layer (what
    transformers' cache holds), not num_key_value_heads x head_dim."""
    cfg = _deepseek_config(layers=3)
    assert attnzoo.kv_cache_bytes(cfg, seq_len=10, batch=2, dtype=torch.bfloat16) == 3 * (8 + 4) * 2 * 10 * 2
