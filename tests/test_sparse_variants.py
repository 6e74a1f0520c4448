"""Sparse modules: options vs the float64 oracle, receptive fields, decoding, errors, agreement with HF."""
import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.variants import KVCache, RollingKVCache

from oracle import sparse_keep, sparse_reference

VARIANTS = {  # name -> options (small, lengths below are not multiples of anything)
    "sliding_window": dict(window=3),
    "longformer": dict(window=2, global_tokens=(1, 6, 12)),
    "longformer_first": dict(window=4, global_tokens=2),
    "bigbird": dict(block_size=3, window=3, global_blocks=2, random_blocks=1, seed=5),
    "sparse_strided": dict(stride=4),
    "sparse_fixed": dict(stride=5, summary=2),
}


def _make(key, **kw):
    name = "longformer" if key.startswith("longformer") else key
    opts = dict(dim=32, heads=4, **VARIANTS[key])
    opts.update(kw)
    return attnzoo.create(name, **opts).double()


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extra", [{}, {"groups": 2, "rope": True, "bias": True}], ids=["mha", "gqa-rope-bias"])
def test_module_matches_reference(key, causal, extra):
    m = _make(key, causal=causal, **extra)
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[1, 19:] = False
    kpm[0, :2] = False
    y = m(x, key_padding_mask=kpm)
    ref = sparse_reference(m, x, key_padding_mask=kpm)
    torch.testing.assert_close(y, ref, rtol=1e-7, atol=1e-7)  # RoPE tables are float32, as the dense module's
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_global_projections_match_reference(causal):
    m = _make("longformer", causal=causal, global_projections=True, bias=True)
    assert {"q_global_proj", "k_global_proj", "v_global_proj"} <= {n for n, _ in m.named_children()}
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 19, dtype=torch.bool)
    kpm[1, 15:] = False
    y = m(x, key_padding_mask=kpm)
    ref = sparse_reference(m, x, key_padding_mask=kpm)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
def test_receptive_field(key, causal):
    """Output i changes when token j changes iff the pattern keeps (i, j) (or j == i: its own query)."""
    m = _make(key, causal=causal)
    n = 14
    x = torch.randn(1, n, 32, dtype=torch.float64)
    keep = sparse_keep(m.config, n) | torch.eye(n, dtype=torch.bool)
    with torch.no_grad():
        y = m(x)
        for j in range(n):
            x2 = x.clone()
            x2[:, j] += torch.randn(32, dtype=torch.float64)
            changed = (m(x2) - y).abs().amax(-1)[0] > 1e-12
            assert torch.equal(changed, keep[:, j]), f"token {j}: changed {changed.tolist()}"


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("prefill", [1, 6])
def test_decoding_equals_full_forward(key, prefill):
    m = _make(key, causal=True, rope=True, groups=2)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = m(x)
    cache = m.make_cache()
    assert isinstance(cache, RollingKVCache if key == "sliding_window" else KVCache)
    outs = [m(x[:, :prefill], cache=cache)]
    outs += [m(x[:, i:i + 1], cache=cache) for i in range(prefill, 21)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seq_len == 21


def test_sliding_window_also_decodes_with_a_plain_kv_cache_and_in_chunks():
    m = _make("sliding_window", causal=True, rope=True)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = m(x)
    for cache in (KVCache(), RollingKVCache(3)):
        outs = [m(x[:, i:i + 4], cache=cache) for i in range(0, 20, 4)]  # chunks longer than... the window
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_rolling_cache_memory_stays_constant():
    m = _make("sliding_window", causal=True, window=8).eval()
    x = torch.randn(1, 400, 32, dtype=torch.float64)
    cache = m.make_cache()
    sizes = []
    with torch.no_grad():
        m(x[:, :50], cache=cache)  # a prompt longer than the window
        for i in range(50, 400):
            m(x[:, i:i + 1], cache=cache)
            sizes.append(cache.nbytes())
    per_token = 2 * m.kv_heads * m.head_dim * 8
    assert max(sizes) == min(sizes) == 2 * 8 * per_token  # 2 * window slots, whatever the length
    assert cache.kept == 8 and cache.seq_len == 400


def test_rolling_cache_with_left_padding():
    m = _make("sliding_window", causal=True, rope=True)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, :5] = False  # the second prompt is left-padded
    full = m(x, key_padding_mask=kpm)
    cache = m.make_cache()
    outs = [m(x[:, :6], key_padding_mask=kpm[:, :6], cache=cache)]
    outs += [m(x[:, i:i + 1], key_padding_mask=kpm[:, :i + 1], cache=cache) for i in range(6, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_rolling_cache_under_autograd():
    m = _make("sliding_window", causal=True)
    x = torch.randn(1, 9, 32, dtype=torch.float64, requires_grad=True)
    cache = m.make_cache()
    y = torch.cat([m(x[:, :4], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(4, 9)], 1)
    torch.testing.assert_close(y, m(x))
    g = torch.autograd.grad(y.sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(m(x).sum(), x)[0])


@pytest.mark.parametrize("call, msg", [
    (lambda m, x: m(x, x), "self-attention pattern: context"),
    (lambda m, x: m(x, attn_mask=torch.ones(5, 5, dtype=torch.bool)), "attn_mask is not supported"),
])
def test_unsupported_arguments_raise(call, msg):
    m = _make("sliding_window")
    with pytest.raises(ValueError, match=msg):
        call(m, torch.randn(1, 5, 32, dtype=torch.float64))


def test_cache_misuse_raises():
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="RollingKVCache serves causal sliding_window only"):
        _make("longformer", causal=True)(x, cache=RollingKVCache(4))
    with pytest.raises(ValueError, match=r"RollingKVCache\(window=2\) keeps fewer keys than this module's window=3"):
        _make("sliding_window", causal=True)(x, cache=RollingKVCache(2))
    with pytest.raises(ValueError, match="global_projections=True does not decode with a cache"):
        _make("longformer", causal=True, global_projections=True)(x, cache=KVCache())
    with pytest.raises(ValueError, match="window=0"):
        RollingKVCache(0)


def test_kv_cache_bytes_of_a_sliding_window_is_bounded():
    cfg = attnzoo.registry.get("sliding_window").make_config(dim=64, heads=4, window=100, causal=True)
    per_token = attnzoo.kv.kv_bytes_per_token(cfg)
    assert attnzoo.kv_cache_bytes(cfg, 50) == 50 * per_token
    assert attnzoo.kv_cache_bytes(cfg, 10_000) == attnzoo.kv_cache_bytes(cfg, 1_000) == 100 * per_token
    m = attnzoo.create("sliding_window", dim=64, heads=4, window=100, causal=True)
    assert attnzoo.kv_cache_bytes(m, 10_000, dtype=torch.float16) == 100 * per_token


# ---------------------------------------------------------------------------- Hugging Face
def _copy(dst, src):
    dst.weight.data.copy_(src.weight.data)
    if dst.bias is not None:
        dst.bias.data.copy_(src.bias.data)


def _identity_out(m):
    torch.nn.init.eye_(m.o_proj.weight)


@pytest.mark.parametrize("shared_globals", [False, True], ids=["global_projections", "shared"])
def test_longformer_matches_hf(shared_globals):
    """attention_window=2*window; global tokens at arbitrary positions; padding (HF zeroes padded query rows,
    ours attend like any query; only real rows are compared)."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    w, n, dim = 2, 16, 32
    hf = LongformerSelfAttention(LongformerConfig(hidden_size=dim, num_attention_heads=4, attention_window=[2 * w],
                                                  attention_probs_dropout_prob=0.0), 0).double().eval()
    globs = (1, 6, 13)
    m = attnzoo.create("longformer", dim=dim, heads=4, window=w, global_tokens=globs, bias=True, out_bias=False,
                       global_projections=not shared_globals).double()
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        _copy(getattr(m, f"{ours}_proj"), getattr(hf, theirs))
        if shared_globals:
            _copy(getattr(hf, f"{theirs}_global"), getattr(hf, theirs))
        else:
            _copy(getattr(m, f"{ours}_global_proj"), getattr(hf, f"{theirs}_global"))
    _identity_out(m)
    x = torch.randn(2, n, dim, dtype=torch.float64)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, 12:] = False
    mask = torch.zeros(2, n, dtype=torch.float64)
    mask[:, list(globs)] = 10000.0
    mask[~kpm] = -10000.0
    with torch.no_grad():
        theirs = hf(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                    is_global_attn=True)[0]
        ours = m(x, key_padding_mask=kpm)
    torch.testing.assert_close(ours[kpm], theirs[kpm], rtol=1e-6, atol=1e-6)  # HF's softmax runs in float32


def _hf_bigbird(dim, heads, block, r, n):
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    cfg = BigBirdConfig(hidden_size=dim, num_attention_heads=heads, block_size=block, num_random_blocks=r,
                        attention_type="block_sparse", max_position_embeddings=n, attention_probs_dropout_prob=0.0)
    hf = BigBirdBlockSparseAttention(cfg, seed=0).double()

    def run(x):
        nb = n // block
        am = torch.ones(x.shape[0], n, dtype=torch.float64)
        blocked = am.view(-1, nb, block)
        exp_blocked = torch.cat([blocked[:, 1:-3], blocked[:, 2:-2], blocked[:, 3:-1]], dim=2)
        band = torch.einsum("blq,blk->blqk", blocked[:, 2:-2], exp_blocked).unsqueeze(1)
        return hf(x, band_mask=band, from_mask=am.view(-1, 1, n, 1), to_mask=am.view(-1, 1, 1, n),
                  from_blocked_mask=blocked, to_blocked_mask=blocked)[0]
    return hf, run


@pytest.mark.parametrize("r", [1, 2])
def test_bigbird_matches_hf_given_the_same_random_blocks(monkeypatch, r):
    """HF's BigBirdBlockSparseAttention with its random blocks replaced by ours (for every head) gives our
    output: window = 3 blocks (window=block_size), global = first and last block (global_blocks=2), r random
    blocks outside both. The draws differ: HF draws per head with numpy in training and, in evaluation,
    points every random block at block 0 (counting it twice); ours is drawn once from `seed`, the same in
    training and evaluation."""
    dim, heads, block, n = 32, 4, 4, 48
    hf, run = _hf_bigbird(dim, heads, block, r, n)
    m = attnzoo.create("bigbird", dim=dim, heads=heads, block_size=block, window=block, global_blocks=2,
                       random_blocks=r, seed=11, bias=True, out_bias=False).double()
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        _copy(getattr(m, f"{ours}_proj"), getattr(hf, theirs))
    _identity_out(m)
    table = m.pattern.random_table(n)  # [nb, nb] bool
    nb = n // block
    rand = np.stack([table[qb].nonzero().flatten().numpy() for qb in range(1, nb - 1)]).astype(np.int32)
    assert rand.shape == (nb - 2, r)
    monkeypatch.setattr(type(hf), "_bigbird_block_rand_mask_with_head",
                        lambda self, *a, **kw: [rand.copy() for _ in range(heads)])
    x = torch.randn(2, n, dim, dtype=torch.float64)
    with torch.no_grad():
        for mode in (hf.train, hf.eval):
            mode()
            torch.testing.assert_close(m(x), run(x), rtol=1e-9, atol=1e-9)
