"""mha / gqa / mqa modules: options, cross-attention, decoding, GQA = MHA with repeated K/V."""
import pytest
import torch

import attnzoo
from attnzoo.variants import KVCache

from oracle import dense_reference


def _gqa(**kw):
    opts = dict(dim=32, heads=4, groups=2, causal=True, rope=True)
    opts.update(kw)
    return attnzoo.create("gqa", **opts).double()


@pytest.mark.parametrize("rope", [False, True, {"rotary_dim": 4}, {"style": "interleaved"},
                                  {"rotary_dim": 6, "style": "interleaved", "base": 500.0}])
@pytest.mark.parametrize("bias", [False, True])
def test_options_match_reference(rope, bias):
    m = _gqa(rope=rope, bias=bias, head_dim=12)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    # RoPE tables are computed in float32 like Hugging Face's (bit-compatible in float32), hence 1e-7
    torch.testing.assert_close(m(x), dense_reference(m, x), rtol=1e-7, atol=1e-7)


def test_bool_attn_mask_and_padding():
    m = _gqa(causal=False)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.rand(2, 4, 7, 7) > 0.4
    mask[..., 0] = True
    kpm = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    got = m(x, attn_mask=mask, key_padding_mask=kpm)
    torch.testing.assert_close(got, dense_reference(m, x, attn_mask=mask, key_padding_mask=kpm))


def test_cross_attention_on_context():
    m = attnzoo.create("gqa", dim=32, heads=4, groups=2, context_dim=24).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)  # text queries
    img = torch.randn(2, 13, 24, dtype=torch.float64)  # image tokens
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, 10:] = False
    got = m(x, img, key_padding_mask=kpm)
    torch.testing.assert_close(got, dense_reference(m, x, context=img, key_padding_mask=kpm))
    # cached cross-attention: context projected once, reused at every decode step
    cache = KVCache()
    steps = [m(x[:, i:i + 1], img, key_padding_mask=kpm, cache=cache) for i in range(5)]
    assert cache.seq_len == 13  # projected once, not appended again
    torch.testing.assert_close(torch.cat(steps, 1), got)


def test_causal_module_rejects_context():
    m = _gqa()
    with pytest.raises(ValueError, match="causal=True"):
        m(torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 4, 32, dtype=torch.float64))


@pytest.mark.parametrize("name, extra", [("mha", {}), ("gqa", {"groups": 2}), ("mqa", {})])
@pytest.mark.parametrize("prefill", [1, 4])
def test_incremental_decoding_equals_full_forward(name, extra, prefill):
    m = attnzoo.create(name, dim=32, heads=4, causal=True, rope=True, **extra).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    full = m(x)
    cache = KVCache(min_capacity=2)  # small capacity: exercises buffer growth
    outs = [m(x[:, :prefill], cache=cache)]
    outs += [m(x[:, i:i + 1], cache=cache) for i in range(prefill, 10)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seq_len == 10
    assert cache.nbytes() >= 2 * 2 * m.kv_heads * 10 * m.head_dim * 8


def test_decoding_with_left_padding():
    m = _gqa()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[1, :3] = False  # second prompt is left-padded
    full = m(x, key_padding_mask=kpm)
    cache = KVCache()
    outs = [m(x[:, :5], key_padding_mask=kpm[:, :5], cache=cache)]
    outs += [m(x[:, i:i + 1], key_padding_mask=kpm[:, :i + 1], cache=cache) for i in range(5, 8)]
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, full)
    assert torch.equal(got[1, :3], m.o_proj.bias.expand(3, -1) if m.o_proj.bias is not None
                       else torch.zeros(3, 32, dtype=torch.float64))


def test_gqa_equals_mha_with_repeated_kv_weights():
    g = attnzoo.create("gqa", dim=32, heads=4, groups=2, bias=True, causal=True, rope=True).double()
    m = attnzoo.create("mha", dim=32, heads=4, bias=True, causal=True, rope=True).double()
    hd, rep = 8, 2
    with torch.no_grad():
        m.q_proj.load_state_dict(g.q_proj.state_dict())
        m.o_proj.load_state_dict(g.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(g, name), getattr(m, name)
            dst.weight.copy_(src.weight.view(2, hd, 32).repeat_interleave(rep, 0).reshape(32, 32))
            dst.bias.copy_(src.bias.view(2, hd).repeat_interleave(rep, 0).reshape(32))
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(g(x), m(x), rtol=1e-10, atol=1e-10)


def test_mqa_has_one_kv_head_and_smaller_cache():
    mqa = attnzoo.create("mqa", dim=64, heads=8)
    mha = attnzoo.create("mha", dim=64, heads=8)
    assert mqa.k_proj.out_features == 8 and mha.k_proj.out_features == 64
    assert attnzoo.kv_cache_bytes(mha, 100) == 8 * attnzoo.kv_cache_bytes(mqa, 100)
    assert attnzoo.kv_cache_bytes(mqa.config, 10, batch=3, dtype=torch.bfloat16) == 3 * 10 * 2 * 8 * 2


def test_dropout_only_in_training():
    m = _gqa(dropout=0.5)
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_position_ids():
    m = _gqa()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pos = torch.arange(3, 9)
    torch.testing.assert_close(m(x, position_ids=pos), dense_reference(m, x, positions=pos))
    with pytest.raises(ValueError, match="position_ids has shape"):
        m(x, position_ids=torch.arange(5))


BAD = [
    ("gqa", dict(dim=64, heads=8), ValueError, "gqa needs groups"),
    ("gqa", dict(dim=64, heads=8, groups=3), ValueError, r"groups=3: must divide heads=8; valid groups: \[1, 2, 4, 8\]"),
    ("gqa", dict(dim=64, heads=8, groups=0), ValueError, "groups=0"),
    ("gqa", dict(dim=64, heads=8, groups=2.0), TypeError, "groups=2.0"),
    ("mha", dict(dim=64, heads=8, groups=2), ValueError, "groups must equal heads=8"),
    ("mqa", dict(dim=64, heads=8, groups=2), ValueError, "groups must be 1"),
    ("mha", dict(dim=64, heads=7), ValueError, "heads=7 does not divide dim=64"),
    ("mha", dict(dim=64), ValueError, "needs option.*heads"),
    ("mha", dict(dim=64, heads=8, dropout=1.0), ValueError, r"dropout=1.0: expected a float in \[0, 1\)"),
    ("mha", dict(dim=64, heads=8, causal="yes"), TypeError, "causal='yes'"),
    ("mha", dict(dim=64, heads=8, rope={"style": "neox"}), ValueError, "rope.style='neox'"),
    ("mha", dict(dim=64, heads=8, rope={"rotary_dim": 12}), ValueError, "rope.rotary_dim=12: must be <= head_dim=8"),
    ("mha", dict(dim=64, heads=8, rope={"rotary_dim": 3}), ValueError, "even"),
    ("mha", dict(dim=64, heads=8, rope="yes"), TypeError, "rope='yes'"),
    ("mha", dict(dim=64, heads=8, window=4), ValueError, "unknown option 'window' for variant 'mha'"),
]


@pytest.mark.parametrize("name, opts, exc, msg", BAD)
def test_bad_options_raise_clearly(name, opts, exc, msg):
    with pytest.raises(exc, match=msg):
        attnzoo.create(name, **opts)


def test_bad_forward_inputs():
    m = _gqa()
    with pytest.raises(ValueError, match="hidden_states has shape"):
        m(torch.randn(3, 32, dtype=torch.float64))
    cache = KVCache()
    m(torch.randn(2, 3, 32, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="reset"):
        m(torch.randn(3, 1, 32, dtype=torch.float64), cache=cache)
