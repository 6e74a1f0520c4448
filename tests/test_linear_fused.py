"""The fused window hybrid of the linear op (the exact-softmax window and the linear part with their one
normaliser in the Triton kernels, :func:`attnzoo.ops.linear.triton_kernel.window_fused`), under Triton's
interpreter on CPU, against the float64 definition (:mod:`attnzoo.ops.linear.naive`): forward and backward,
windows 1, 7 and 64 (wider than the chunk asked for), odd lengths, padding, grouped KV heads, with and without
log-scales; the receptive field; the state for a cache; the window the kernels refuse."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.linear.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from attnzoo.ops.linear import linear_attention, linear_attention_naive  # noqa: E402
from attnzoo.ops.linear import triton_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(triton_kernel.available() is not None, reason="the Triton kernels cannot run here")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-4, atol=2e-4) if DEV == "cpu" else dict(rtol=1e-2, atol=1e-2)  # TF32 dots on a GPU


def _inputs(b, hq, hkv, n, f, d, gated, padded=True):
    kw = dict(dtype=torch.float32, device=DEV)
    t = dict(qf=torch.rand(b, hq, n, f, **kw), kf=torch.rand(b, hkv, n, f, **kw), v=torch.randn(b, hkv, n, d, **kw),
             q=torch.randn(b, hq, n, d, **kw), k=torch.randn(b, hkv, n, d, **kw))
    if gated:
        t["q_log"], t["k_log"] = torch.randn(b, hq, n, **kw) * 4, torch.randn(b, hkv, n, **kw) * 4
    valid = torch.ones(b, n, dtype=torch.bool, device=DEV)
    if padded:
        valid[-1, : n // 4] = False
        valid[0, n - 3:] = False
    return t, (valid if padded else None)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused window forwards (so a test knows the kernels, not the PyTorch window, ran)."""
    calls = []
    inner = triton_kernel._win_forward

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return inner(*a, **kw)
    monkeypatch.setattr(triton_kernel, "_win_forward", spy)
    return calls


CASES = [  # window, chunk, n, hq, hkv, gated, padded
    (1, 16, 37, 2, 1, True, True),
    (7, 16, 37, 4, 2, True, True),
    (7, 16, 33, 2, 2, False, False),
    (64, 16, 131, 2, 1, True, True),  # window > chunk: the kernels' chunk grows to 64
]


@pytest.mark.parametrize("window,chunk,n,hq,hkv,gated,padded", CASES)
def test_window_fused_matches_naive_forward_and_backward(fused_calls, window, chunk, n, hq, hkv, gated, padded):
    t, valid = _inputs(2, hq, hkv, n, 16, 16, gated, padded)
    leaves = {k: x.requires_grad_() for k, x in t.items()}
    got = linear_attention(**leaves, causal=True, key_padding_mask=valid, window=window, chunk=chunk,
                           backend="triton")
    assert fused_calls, "the fused window kernels did not run"
    cpu = {k: x.detach().cpu().double().requires_grad_() for k, x in leaves.items()}
    vcpu = valid.cpu() if valid is not None else None
    ref = linear_attention_naive(**cpu, causal=True, key_padding_mask=vcpu, window=window)
    torch.testing.assert_close(got.double().cpu(), ref, **TOL)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(got, list(leaves.values()), g.to(got))
    gb = torch.autograd.grad(ref, list(cpu.values()), g)
    for name, a, b in zip(leaves, ga, gb):
        torch.testing.assert_close(a.double().cpu(), b, **TOL, msg=lambda m: f"d{name}: {m}")


def test_window_fused_receptive_field(fused_calls):
    """Changing the tokens after t leaves the outputs up to t bit-identical (the key stabiliser is a running
    maximum, the window's and the row's normaliser use nothing after the query)."""
    t, valid = _inputs(1, 2, 1, 45, 16, 16, True)
    a = linear_attention(**t, causal=True, key_padding_mask=valid, window=7, chunk=16, backend="triton")
    s = 20
    t2 = {k: torch.cat([x[:, :, :s], torch.randn_like(x[:, :, s:]) * 5 + 3 * (x.dim() == 3)], 2)
          for k, x in t.items()}
    t2["qf"], t2["kf"] = t2["qf"].abs(), t2["kf"].abs()
    b = linear_attention(**t2, causal=True, key_padding_mask=valid, window=7, chunk=16, backend="triton")
    assert torch.equal(a[:, :, :s], b[:, :, :s])
    assert len(fused_calls) == 2


def test_window_fused_state_for_a_cache(fused_calls):
    """Prefill with ``return_state`` then the rest with the state and the last ``window`` keys prepended (as
    the module's cache does) equals one call; the state's keys stop ``window`` before the end."""
    W = 7
    t, valid = _inputs(1, 2, 1, 41, 16, 16, True)
    full = linear_attention_naive(**t, causal=True, key_padding_mask=valid, window=W)
    s = 22
    first = {k: x[:, :, :s] for k, x in t.items()}
    o1, st = linear_attention(**first, causal=True, key_padding_mask=valid[:, :s], window=W, chunk=16,
                              return_state=True, backend="triton")
    rest = {k: x[:, :, s - W:] for k, x in t.items()}
    o2 = linear_attention(**rest, causal=True, key_padding_mask=valid[:, s - W:], window=W, chunk=16,
                          initial_state=st, backend="triton")
    torch.testing.assert_close(torch.cat([o1, o2[:, :, W:]], 2).double().cpu(), full.cpu(), **TOL)
    assert len(fused_calls) == 2
    _, st_torch = linear_attention(**{k: x.double() for k, x in first.items()}, causal=True,
                                   key_padding_mask=valid[:, :s], window=W, chunk=16, return_state=True,
                                   backend="torch")
    real = st_torch.kv * st_torch.m.exp()[..., None, None]
    torch.testing.assert_close((st.kv.double() * st.m.double().exp()[..., None, None]), real, **TOL)


def test_window_too_wide_for_the_kernels():
    t, _ = _inputs(1, 2, 1, 20, 16, 16, False)
    with pytest.raises(ValueError, match=r"window=200.*window <= 128.*backend='auto'"):
        linear_attention(**t, causal=True, window=200, backend="triton")


# ------------------------------------------------------------------ non-causal FAVOR+, the feature map fused
def _favor_reference(q, k, v, projection, scale, valid):
    from attnzoo.variants.feature_maps import favor_features

    qf, ql = favor_features(q, projection.double(), scale)
    kf, kl = favor_features(k, projection.double(), scale)
    return linear_attention_naive(qf, kf, v, q_log=ql, k_log=kl, key_padding_mask=valid)


MIXED_TILES = dict(kv_state=(32, 128), out=(128, 32), dstate=(128, 32), dq=(32, 128), dk=(128, 32))


@pytest.mark.parametrize("hq,hkv,n,m,padded,tiles", [(4, 2, 77, 80, True, None), (2, 2, 64, 64, False, None),
                                                     (4, 2, 77, 80, True, MIXED_TILES)])
def test_favor_fused_matches_naive_forward_and_backward(hq, hkv, n, m, padded, tiles, monkeypatch):
    """``m`` = 80: a partial block of features; 77 tokens: a partial block of rows; padding; GQA; each kernel with
    its own tile (rows and features per block, the state's partial sums laid out by their own kernel's)."""
    from attnzoo.ops.linear import favor
    from attnzoo.ops.linear.favor import exp_map_fits, favor_attention, favor_map
    from attnzoo.variants.feature_maps import orthogonal_gaussian

    if tiles:
        monkeypatch.setattr(favor, "TILES", {k: favor.Tile(bn, bm) for k, (bn, bm) in tiles.items()})

    d, scale = 16, 16**-0.5
    proj = orthogonal_gaussian(m, d, 0).to(DEV)
    q, k, v = torch.randn(2, hq, n, d, device=DEV), torch.randn(2, hkv, n, d, device=DEV), \
        torch.randn(2, hkv, n, d, device=DEV)
    valid = None
    if padded:
        valid = torch.ones(2, n, dtype=torch.bool, device=DEV)
        valid[1, :20] = False
        valid[0, n - 7:] = False
    mp = favor_map(proj, scale)
    assert exp_map_fits(q, v, mp, mp, backend="triton") and not exp_map_fits(q, v, mp, mp, backend="torch")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = favor_attention(*leaves, proj, scale=scale, key_padding_mask=valid)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = _favor_reference(*ref_leaves, proj.cpu(), scale, valid.cpu() if valid is not None else None)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL)
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g.to(out)), torch.autograd.grad(ref, ref_leaves, g)):
        torch.testing.assert_close(a.double().cpu(), b, **TOL, msg=lambda msg: f"d{name}: {msg}")


def test_favor_fused_takes_token_major_views_without_copies():
    """The heads of a ``[b, n, h * d]`` projection go in as the transposed view (strides, no copy): the output and
    the gradients equal the contiguous inputs' (float64 reference), the output is token-major (its transpose back
    is contiguous) and each gradient comes back in its input's layout."""
    from attnzoo.ops.linear.favor import favor_attention
    from attnzoo.variants.feature_maps import orthogonal_gaussian

    b, hq, hkv, n, d, m, scale = 2, 4, 2, 37, 16, 48, 0.25
    proj = orthogonal_gaussian(m, d, 3).to(DEV)
    flat = [torch.randn(b, n, h * d, device=DEV, requires_grad=True) for h in (hq, hkv, hkv)]
    q, k, v = (x.view(b, n, x.shape[-1] // d, d).transpose(1, 2) for x in flat)
    assert not q.is_contiguous()
    out = favor_attention(q, k, v, proj, scale=scale)
    assert out.transpose(1, 2).is_contiguous()
    ref_leaves = [x.detach().cpu().double().contiguous().requires_grad_() for x in (q, k, v)]
    ref = _favor_reference(*ref_leaves, proj.cpu(), scale, None)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out))
    for name, x, a, r in zip("qkv", (q, k, v), grads, torch.autograd.grad(ref, ref_leaves, g)):
        assert a.stride() == x.stride(), f"d{name} came back in another layout"
        torch.testing.assert_close(a.double().cpu(), r, **TOL, msg=lambda msg: f"d{name}: {msg}")


@pytest.mark.parametrize("kind", ["hedgehog", "performer"])
def test_learned_exp_maps_fused_match_naive(kind):
    """The ``linear`` variant's exponential maps (per head, queries and keys apart; hedgehog with its bias) fused
    into the non-causal kernels, forward and backward to q, k, v, when the maps take no gradient."""
    from attnzoo.ops.linear.favor import exp_map_attention, exp_map_fits
    from attnzoo.variants.feature_maps import FeatureMap

    hq, hkv, n, d = 4, 2, 45, 16
    fq, fk = (FeatureMap(kind, h, d, features=48, scale=d**-0.5, seed=s) for h, s in ((hq, 1), (hkv, 2)))
    with torch.no_grad():
        for fm in (fq, fk):
            fm.weight.add_(torch.randn_like(fm.weight) * 0.3)
            if fm.bias is not None:
                fm.bias.add_(torch.randn_like(fm.bias) * 0.3)
    fq, fk = fq.to(DEV), fk.to(DEV)
    q, k, v = torch.randn(2, hq, n, d, device=DEV), torch.randn(2, hkv, n, d, device=DEV), \
        torch.randn(2, hkv, n, d, device=DEV)
    valid = torch.ones(2, n, dtype=torch.bool, device=DEV)
    valid[0, :9] = False
    assert not exp_map_fits(q, v, fq.exp_map(), fk.exp_map(), backend="triton")  # the maps' weights train
    with torch.no_grad():
        qm, km = fq.exp_map(), fk.exp_map()
    assert exp_map_fits(q, v, qm, km, backend="triton")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = exp_map_attention(*leaves, qm, km, key_padding_mask=valid)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    fq64, fk64 = fq.cpu().double(), fk.cpu().double()
    qf, ql = fq64(ref_leaves[0])
    kf, kl = fk64(ref_leaves[1])
    ref = linear_attention_naive(qf, kf, ref_leaves[2], q_log=ql, k_log=kl, key_padding_mask=valid.cpu())
    torch.testing.assert_close(out.double().cpu(), ref, **TOL)
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g.to(out)), torch.autograd.grad(ref, ref_leaves, g)):
        torch.testing.assert_close(a.double().cpu(), b, **TOL, msg=lambda msg: f"d{name}: {msg}")


def test_exp_maps_fused_only_where_they_apply():
    """t2r/elu are not exponential; a per-head map must match the heads; float64 goes the unfused way."""
    from attnzoo.ops.linear.favor import exp_map_fits, favor_map
    from attnzoo.variants.feature_maps import FeatureMap

    assert FeatureMap("t2r", 2, 16).exp_map() is None and FeatureMap("elu", 2, 16).exp_map() is None
    q = torch.randn(1, 2, 8, 16, device=DEV)
    mp = favor_map(torch.randn(32, 16, device=DEV), 0.25)
    assert exp_map_fits(q, q, mp, mp, backend="triton")
    assert not exp_map_fits(q.double(), q.double(), mp, mp, backend="triton")
    assert not exp_map_fits(q, q, mp, favor_map(torch.randn(48, 16, device=DEV), 0.25), backend="triton")
