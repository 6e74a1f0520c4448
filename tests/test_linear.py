"""The linear family (performer, linear, linformer) against float64 references: odd lengths, padding, grouped
KV heads, causal receptive field, FAVOR+ error against softmax, Linformer identities, the state cache."""

import pytest
import torch

import attnzoo
from attnzoo.variants import LinearStateCache

from oracle import linear_reference, linformer_reference

D64 = dict(dtype=torch.float64)


def _mk(name, **opts):
    base = {"dim": 32, "heads": 4}
    return attnzoo.create(name, **{**base, **opts}).double()


LINEAR_CASES = [
    ("performer", {"features": 16}),
    ("performer", {"features": 16, "groups": 2, "causal": True}),
    ("linear", {"feature_map": "hedgehog", "groups": 2, "causal": True}),
    ("linear", {"feature_map": "t2r"}),
    ("linear", {"feature_map": "elu", "causal": True}),
    ("linear", {"feature_map": "performer", "features": 12, "causal": True, "window": 3}),
    ("linear", {"feature_map": "hedgehog", "groups": 1, "causal": True, "window": 4}),
]


@pytest.mark.parametrize("name,opts", LINEAR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LINEAR_CASES)])
def test_matches_float64_reference_odd_lengths_and_padding(name, opts):
    m = _mk(name, **opts)
    for n in (1, 7, 13):
        x = torch.randn(2, n, 32, **D64)
        kpm = torch.ones(2, n, dtype=torch.bool)
        kpm[1, : n // 3] = False  # left padding
        torch.testing.assert_close(m(x, key_padding_mask=kpm), linear_reference(m, x, key_padding_mask=kpm),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,opts", [c for c in LINEAR_CASES if c[1].get("causal")])
def test_causal_receptive_field(name, opts):
    """Changing tokens after t leaves the outputs up to t unchanged, exactly (the key stabiliser reads no
    future key)."""
    m = _mk(name, **opts)
    x = torch.randn(1, 20, 32, **D64)
    y = x.clone()
    y[:, 11:] = torch.randn(1, 9, 32, **D64) * 30  # large future keys would move a global stabiliser
    torch.testing.assert_close(m(x)[:, :11], m(y)[:, :11], rtol=0, atol=0)


def test_favor_error_falls_as_features_grow():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 32, **D64) * 0.5
    errs = []
    for feats in (8, 64, 512):
        errs.append(sum(float((m(x) - _softmax_of(m, x)).pow(2).mean().detach())
                        for m in (_mk("performer", features=feats, seed=s) for s in range(4))))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < errs[0] / 10, errs


def _softmax_of(m, x):
    from oracle import dense_reference
    return dense_reference(m, x)


def test_performer_redraw_is_seeded_and_deterministic():
    a, b = _mk("performer", features=8, redraw=2), _mk("performer", features=8, redraw=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 32, **D64)
    first = a.projection.clone()
    outs_a = [a(x) for _ in range(4)]
    outs_b = [b(x) for _ in range(4)]
    for u, w in zip(outs_a, outs_b):
        torch.testing.assert_close(u, w, rtol=0, atol=0)
    assert not torch.equal(a.projection, first)  # draw 1 happened at the third training forward
    a.eval()
    p = a.projection.clone()
    a(x)
    assert torch.equal(a.projection, p)  # never in evaluation


def test_linformer_reference_and_gqa():
    m = _mk("linformer", k=5, max_len=16, groups=2, per_head=True, share_kv=True)
    x = torch.randn(2, 11, 32, **D64)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[0, 8:] = False
    torch.testing.assert_close(m(x, key_padding_mask=kpm), linformer_reference(m, x, key_padding_mask=kpm),
                               rtol=1e-9, atol=1e-9)


def test_linformer_appending_padding_changes_nothing():
    m = _mk("linformer", k=4, max_len=16).eval()
    x = torch.randn(1, 7, 32, **D64)
    padded = torch.cat([x, torch.randn(1, 5, 32, **D64)], 1)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[:, 7:] = False
    torch.testing.assert_close(m(padded, key_padding_mask=kpm)[:, :7], m(x), rtol=1e-12, atol=1e-12)


def test_linformer_with_k_equal_n_and_identity_is_softmax():
    n = 9
    m = _mk("linformer", k=n, max_len=n, share_kv=True).eval()
    with torch.no_grad():
        m.k_seq_proj.copy_(torch.eye(n, **D64)[None])
    x = torch.randn(2, n, 32, **D64)
    from oracle import dense_reference
    torch.testing.assert_close(m(x), dense_reference(m, x), rtol=1e-10, atol=1e-10)


def test_linformer_refuses_causal_and_long_inputs():
    with pytest.raises(ValueError, match="linformer is for encoders.*future"):
        attnzoo.create("linformer", dim=32, heads=4, causal=True)
    m = _mk("linformer", k=4, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        m(torch.randn(1, 9, 32, **D64))


def test_options_are_checked():
    with pytest.raises(ValueError, match="feature_map"):
        attnzoo.create("linear", dim=32, heads=4, feature_map="relu")
    with pytest.raises(ValueError, match="window=4.*causal"):
        attnzoo.create("linear", dim=32, heads=4, window=4)
    with pytest.raises(ValueError, match="k=9"):
        attnzoo.create("linformer", dim=32, heads=4, k=9, max_len=8)


@pytest.mark.parametrize("opts", [{"feature_map": "hedgehog", "groups": 2}, {"feature_map": "performer",
                                  "features": 8, "window": 3, "rope": True}, {"feature_map": "t2r", "window": 5}])
@pytest.mark.parametrize("prefill", [2, 6])
def test_decode_with_state_cache_equals_full_forward(opts, prefill):
    """Prefill, then one token at a time (the left padding reaches into the steps with prefill=2)."""
    m = _mk("linear", causal=True, **opts).eval()
    x = torch.randn(2, 14, 32, **D64)
    kpm = torch.ones(2, 14, dtype=torch.bool)
    kpm[1, :4] = False
    full = m(x, key_padding_mask=kpm)
    cache = m.make_cache()
    parts = [m(x[:, :prefill], key_padding_mask=kpm[:, :prefill], cache=cache)]
    for t in range(prefill, 14):
        parts.append(m(x[:, t:t + 1], key_padding_mask=kpm[:, : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.seq_len == 14


def test_performer_decode_equals_full_forward():
    m = _mk("performer", features=16, causal=True, groups=2).eval()
    x = torch.randn(1, 9, 32, **D64) * 3
    cache = m.make_cache()
    steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(9)], 1)
    torch.testing.assert_close(steps, m(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [0, 16])
def test_state_size_is_constant_in_sequence_length(window):
    """Cache bytes after 1k and 8k tokens are equal (and what the layout says, plus the window's flags)."""
    m = attnzoo.create("linear", dim=16, heads=2, causal=True, feature_map="t2r", window=window).eval()
    sizes = []
    for n in (1024, 8192):
        cache = m.make_cache()
        with torch.no_grad():
            m(torch.randn(1, n, 16), cache=cache)
            m(torch.randn(1, 1, 16), cache=cache)
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1]
    lay = m.config.kv_layout()
    assert lay.state and (lay.window == (window or None))
    assert sizes[0] == lay.nbytes(8193, torch.float32) + window  # + one bool per window slot
    assert isinstance(cache, LinearStateCache) and cache.layout() == lay


def test_wrong_cache_is_refused():
    m = _mk("linear", causal=True)
    with pytest.raises(ValueError, match="make_cache"):
        m(torch.randn(1, 3, 32, **D64), cache=attnzoo.variants.KVCache())
    with pytest.raises(ValueError, match="not causal"):
        _mk("performer").make_cache()
