"""MHA/GQA -> MLA weight maths (attnzoo.conversion.mla) on tiny float64 layers, against a direct computation."""
from __future__ import annotations

import math

import pytest
import torch

from attnzoo.conversion.heads import AttnWeights, RopeSpec
from attnzoo.conversion.mla import (add_anchor, anchor_beta, convert_layer, fold_factor, full_rank,
                                    latent_norm_bound, split_rope)
from attnzoo.ops.rope import apply_rope, inv_frequencies, rope_cos_sin

DIM, T = 24, 7


def _weights(heads, kv_heads, head_dim, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(DIM)  # noqa: E731
    b = (lambda n: r(n)) if bias else (lambda n: None)
    return AttnWeights(q=r(heads * head_dim, DIM), k=r(kv_heads * head_dim, DIM), v=r(kv_heads * head_dim, DIM),
                       o=r(DIM, heads * head_dim), heads=heads, head_dim=head_dim, q_bias=b(heads * head_dim),
                       k_bias=b(kv_heads * head_dim), v_bias=b(kv_heads * head_dim))


def _lin(x, w, b):
    return x @ w.T + (0 if b is None else b)


def _attend(q, k, v, scale):  # [H, T, *]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def source_attention(w, rope, x, scale, base=10000.0):
    H, G, D = w.heads, w.kv_heads, w.head_dim
    q = _lin(x, w.q, w.q_bias).reshape(T, H, D).transpose(0, 1)
    k = _lin(x, w.k, w.k_bias).reshape(T, G, D).transpose(0, 1)
    v = _lin(x, w.v, w.v_bias).reshape(T, G, D).transpose(0, 1)
    cos, sin = rope_cos_sin(torch.arange(T), inv_frequencies(rope.rotary_dim, base), rope.style, torch.float64)
    q, k = apply_rope(q[None], cos, sin, rope.style)[0], apply_rope(k[None], cos, sin, rope.style)[0]
    rep = H // G
    out = _attend(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), scale)
    return out.transpose(0, 1).reshape(T, H * D) @ w.o.T


def mla_attention(m, o, x, base=10000.0, norm_eps=None):
    H, r, nope, rope, vd, R = m.heads, m.kv_rank, m.nope_dim, m.rope_dim, m.v_dim, m.rope_heads
    q = _lin(x, m.q, m.q_bias).reshape(T, H, nope + rope).transpose(0, 1)
    ckv = _lin(x, m.kv_a, m.kv_a_bias)
    c, kr = ckv[:, :r], ckv[:, r:].reshape(T, R, rope).transpose(0, 1)
    if norm_eps is not None:
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm_eps)
    kv = (c @ m.kv_b.T).reshape(T, H, nope + vd).transpose(0, 1)
    cos, sin = rope_cos_sin(torch.arange(T), inv_frequencies(rope, base), "half", torch.float64)
    qr = apply_rope(q[None, :, :, nope:], cos, sin)[0]
    kr = apply_rope(kr[None], cos, sin)[0].repeat_interleave(H // R, 0)
    k = torch.cat([kv[..., :nope], kr], -1)
    qq = torch.cat([q[..., :nope], qr], -1)
    out = _attend(qq, k, kv[..., nope:], m.scale)
    return out.transpose(0, 1).reshape(T, H * vd) @ o.T


def _x(seed=1):
    return torch.randn(T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_mqa_full_rank_all_rope_is_exact(style):
    w, rope = _weights(4, 1, 8, bias=True), RopeSpec(8, style)
    m = convert_layer(w, rope, kv_rank=9, rope_dim=8, scale=8 ** -0.5)
    assert m.nope_dim == 0 and m.rope_heads == 1
    x = _x()
    torch.testing.assert_close(mla_attention(m, w.o, x), source_attention(w, rope, x, 8 ** -0.5), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["pca", "norm"])
def test_per_head_rope_keys_full_rank_gqa_is_exact(method):
    w, rope = _weights(4, 2, 8, bias=True), RopeSpec(8)
    m = convert_layer(w, rope, kv_rank=64, rope_dim=8, scale=0.3, rope_keys="per_head", rope_method=method)
    assert m.rope_heads == 2 and m.nope_dim == 0
    x = _x()
    torch.testing.assert_close(mla_attention(m, w.o, x), source_attention(w, rope, x, 0.3), atol=1e-10, rtol=0)


def test_partial_rotary_dims_stay_nope():
    w, rope = _weights(4, 1, 12), RopeSpec(8)  # 4 dims RoPE never touches
    m = convert_layer(w, rope, kv_rank=16, rope_dim=8, scale=12 ** -0.5)
    assert m.nope_dim == 4
    x = _x()
    torch.testing.assert_close(mla_attention(m, w.o, x), source_attention(w, rope, x, 12 ** -0.5), atol=1e-10, rtol=0)


def test_heads_equal_up_to_a_phase_per_pair_need_one_shared_rope_key():
    """Complex PCA: KV head 2 is head 1 turned and scaled per frequency pair; one shared rope key holds both."""
    w, rope = _weights(4, 1, 8, bias=True), RopeSpec(8)
    a, b = rope.pairs()
    k = w.k.clone()
    kb = w.k_bias.clone()
    z = torch.complex(k[a], k[b]) * torch.tensor([0.5 + 1j, -2.0, 1j, 0.3 - 0.2j], dtype=torch.complex128)[:, None]
    zb = torch.complex(kb[a], kb[b]) * torch.tensor([0.5 + 1j, -2.0, 1j, 0.3 - 0.2j], dtype=torch.complex128)
    k2, kb2 = torch.empty_like(k), torch.empty_like(kb)
    k2[a], k2[b], kb2[a], kb2[b] = z.real, z.imag, zb.real, zb.imag
    w2 = w.replace(k=torch.cat([k, k2]), v=torch.cat([w.v, w.v.flip(0)]), k_bias=torch.cat([kb, kb2]),
                   v_bias=torch.cat([w.v_bias, w.v_bias.flip(0)]))
    sp = split_rope(w2, rope, 8)
    assert sp.k_nope.abs().max() < 1e-12  # nothing left for the position-free part
    m = convert_layer(w2, rope, kv_rank=40, rope_dim=8, scale=0.4)
    x = _x()
    torch.testing.assert_close(mla_attention(m, w2.o, x), source_attention(w2, rope, x, 0.4), atol=1e-10, rtol=0)


@pytest.mark.parametrize("rope_dim,method,keys", [(8, "pca", "shared"), (4, "pca", "shared"), (2, "norm", "shared"),
                                                  (4, "norm", "per_head"), (4, "pca", "per_head")])
@pytest.mark.parametrize("calibrated", [False, True])
def test_full_rank_equals_the_partial_rope_intermediate(rope_dim, method, keys, calibrated):
    w, rope = _weights(4, 2, 8, bias=True), RopeSpec(8)
    xs = _x(5).repeat(8, 1) + 0.1 * torch.randn(8 * T, DIM, dtype=torch.float64)
    xa = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    gram = (xa.T @ xa / len(xa)) if calibrated else None
    inter = full_rank(w, rope, rope_dim=rope_dim, scale=0.35, rope_keys=keys, rope_method=method, gram=gram)
    rows = inter.kv_rank
    m = convert_layer(w, rope, kv_rank=rows, rope_dim=rope_dim, scale=0.35, rope_keys=keys, rope_method=method,
                      gram=gram)
    x = _x()
    torch.testing.assert_close(mla_attention(m, w.o, x), mla_attention(inter, w.o, x), atol=1e-9, rtol=0)
    # and the low-rank versions get closer to it as the rank grows
    errs = [(mla_attention(convert_layer(w, rope, kv_rank=r, rope_dim=rope_dim, scale=0.35, rope_keys=keys,
                                         rope_method=method, gram=gram), w.o, x)
             - mla_attention(inter, w.o, x)).norm().item() for r in (4, 12, rows)]
    assert errs[0] >= errs[1] - 1e-9 and errs[2] < 1e-8


def test_calibrated_pca_beats_weight_svd_on_its_data():
    w, rope = _weights(8, 2, 8, bias=False, seed=3), RopeSpec(8)
    g = torch.Generator().manual_seed(7)
    basis = torch.randn(6, DIM, generator=g, dtype=torch.float64)  # inputs on a 6-dim subspace
    x = torch.randn(T, 6, generator=g, dtype=torch.float64) @ basis
    xs = torch.randn(400, 6, generator=g, dtype=torch.float64) @ basis
    xa = torch.cat([xs, torch.ones(400, 1, dtype=torch.float64)], 1)
    gram = xa.T @ xa / 400
    ref = source_attention(w, rope, x, 8 ** -0.5)
    err = {}
    for name, gm in (("svd", None), ("pca", gram)):
        m = convert_layer(w, rope, kv_rank=8, rope_dim=4, scale=8 ** -0.5, gram=gm)
        err[name] = (mla_attention(m, w.o, x) - ref).norm().item()
    assert err["pca"] < err["svd"]


def test_anchor_makes_kv_a_layernorm_harmless():
    w, rope = _weights(4, 1, 8, bias=True), RopeSpec(8)
    m = convert_layer(w, rope, kv_rank=9, rope_dim=8, scale=8 ** -0.5)
    x = _x()
    ref = source_attention(w, rope, x, 8 ** -0.5)
    bound = latent_norm_bound(m, x.norm(dim=-1).max().item())
    for tol in (1e-4, 1e-8):
        a = add_anchor(m, anchor_beta(bound, tol))
        assert a.kv_rank == 10
        err = (mla_attention(a, w.o, x, norm_eps=1e-6) - ref).abs().max().item()
        assert err < 20 * tol * ref.abs().max().item()
    without = (mla_attention(m, w.o, x, norm_eps=1e-6) - ref).abs().max().item()
    assert without > 1e-3  # the layernorm alone would change the model


def test_bad_rope_dim_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"rope_dim=6.*valid: \[2, 4, 8\]"):
        fold_factor(8, 6)
    assert fold_factor(64, 16) == 4
