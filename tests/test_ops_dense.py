"""attnzoo.ops.attention: every CPU backend against the float64 oracle; dispatch and forcing."""
import pytest
import torch

import attnzoo
from attnzoo.errors import BackendUnavailableError
from attnzoo.ops import attention, explain, use_backend
from attnzoo.ops.dense.backends import BACKENDS
from attnzoo.ops.dense.call import AttentionCall

from oracle import naive_attention

CPU_BACKENDS = ["eager", "sdpa_math", "sdpa_flash", "flex"]


def _inputs(b=2, hq=4, hkv=2, nq=7, nk=7, d=16, dtype=torch.float64):
    q = torch.randn(b, hq, nq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _masks(kind, b, hq, nq, nk):
    if kind == "none":
        return {}
    if kind == "padding":
        kpm = torch.ones(b, nk, dtype=torch.bool)
        kpm[0, nk - 3:] = False  # right padding
        kpm[-1, :2] = False  # left padding
        return {"key_padding_mask": kpm}
    if kind == "bool":
        return {"mask": torch.rand(b, hq, nq, nk) > 0.3}
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "bool"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lens", [(7, 7), (3, 11), (1, 9)], ids=["self", "cached", "decode"])
def test_backend_matches_oracle(backend, causal, masks, heads, lens):
    hq, hkv = heads
    nq, nk = lens
    q, k, v = _inputs(hq=hq, hkv=hkv, nq=nq, nk=nk)
    kw = _masks(masks, 2, hq, nq, nk)
    qkv = (q.detach(), k.detach(), v.detach()) if backend == "flex" else (q, k, v)
    reason = BACKENDS[backend].check(AttentionCall.build(*qkv, causal=causal, **kw))
    if reason is not None:
        assert backend in ("sdpa_flash",) and masks != "none", reason  # only these may be turned down on CPU
        with pytest.raises(BackendUnavailableError, match=backend):
            attention(q, k, v, causal=causal, backend=backend, **kw)
        return
    ref = naive_attention(q, k, v, causal=causal, **kw)
    if backend == "flex":  # FlexAttention has no CPU backward; the GPU tests cover it
        out = attention(q.detach(), k.detach(), v.detach(), causal=causal, backend=backend, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        with pytest.raises(BackendUnavailableError, match="no backward"):
            attention(q, k, v, causal=causal, backend=backend, **kw)
        return
    out = attention(q, k, v, causal=causal, backend=backend, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    go = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), go)
    for got, want in ((gq, rq), (gk, rk), (gv, rv)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["eager", "sdpa_math", "flex"])
def test_fully_masked_rows_are_zero_with_finite_grads(backend):
    q, k, v = _inputs(nq=5, nk=5)
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1] = False  # the whole second sequence is padding
    if backend == "flex":
        out = attention(q.detach(), k.detach(), v.detach(), key_padding_mask=kpm, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
        return
    out = attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_scale_and_float32_inputs():
    q, k, v = _inputs(dtype=torch.float32)
    out = attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, scale=0.3), rtol=1e-4, atol=1e-5)


def test_sdpa_fold_of_groups_is_exact():
    """The path used when a kernel lacks enable_gqa: groups folded into the query length."""
    q, k, v = _inputs(hq=6, hkv=2, nq=5, nk=9)
    call = AttentionCall.build(q, k, v)
    out = BACKENDS["sdpa_math"]._call(q, k, v, None, False, call, fold=True)
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-9, atol=1e-9)


def test_dispatch_prefers_fused_and_explains():
    q, k, v = _inputs(dtype=torch.float32)
    d = explain(q, k, v, causal=True)
    assert d.backend == "sdpa_flash" and not d.forced
    kpm = torch.ones(2, 7, dtype=torch.bool)
    d = explain(q, k, v, key_padding_mask=kpm)
    assert d.backend == "sdpa_math"
    assert "mask" in d.rejected["sdpa_flash"]
    assert "sdpa_math" in str(d)
    attention(q, k, v)
    assert attnzoo.ops.last_decision().backend == "sdpa_flash"


def test_forcing_never_falls_back():
    q, k, v = _inputs(dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="sdpa_cudnn.*cuda"):
        attention(q, k, v, backend="sdpa_cudnn")
    with use_backend("eager"):
        attention(q, k, v)
        assert attnzoo.ops.last_decision().backend == "eager"
        assert attnzoo.ops.last_decision().forced
    with use_backend("sdpa_cudnn", "sdpa_math"):  # a priority list
        attention(q, k, v)
        assert attnzoo.ops.last_decision().backend == "sdpa_math"
    with pytest.raises(ValueError, match="backend='sdpa_cudn'.*sdpa_cudnn"):
        attention(q, k, v, backend="sdpa_cudn")


@pytest.mark.parametrize("bad, exc, msg", [
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q has shape"),
    (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "multiple of kv heads"),
    (dict(causal=1), TypeError, "causal=1"),
    (dict(dropout_p=1.5), ValueError, "dropout_p=1.5"),
    (dict(scale=-1.0), ValueError, "scale=-1.0"),
    (dict(key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "key_padding_mask has shape"),
    (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "additive float masks"),
    (dict(mask=torch.ones(3, 1, 5, 5, dtype=torch.bool)), ValueError, "mask has shape"),
])
def test_bad_arguments_raise_clearly(bad, exc, msg):
    args = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8))
    args.update(bad)
    kw = {k: v for k, v in args.items() if k not in "qkv"}
    with pytest.raises(exc, match=msg):
        attention(args["q"], args["k"], args["v"], **kw)


def test_dropout_is_applied_in_training_only_through_dropout_p():
    q, k, v = _inputs(dtype=torch.float32, nq=16, nk=16)
    a = attention(q, k, v, dropout_p=0.5, backend="sdpa_math")
    b = attention(q, k, v, dropout_p=0.0, backend="sdpa_math")
    assert not torch.allclose(a, b)
    with pytest.raises(BackendUnavailableError, match="dropout"):
        attention(q, k, v, dropout_p=0.5, backend="flex")


def test_explain_lists_every_backend_with_its_reason():
    """README: explain says which backend runs a call and why not the others, every time (not only the
    first call of a signature, which the memo would otherwise answer)."""
    q, k, v = _inputs(dtype=torch.float32)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    for _ in range(2):
        d = explain(q, k, v, key_padding_mask=kpm)
        assert d.backend == "sdpa_math" and d.order == attnzoo.ops.ORDER["cpu"]
        text = str(d)
        lines = text.splitlines()
        assert lines[1].startswith("  1. sdpa_flash: cannot serve:") and "mask" in lines[1]
        assert lines[2] == "  2. sdpa_math: runs this call"
        assert lines[3].startswith("  3. eager: not tried: sdpa_math ranks ahead")
        for name in attnzoo.ops.backend_names():  # every backend is accounted for, with a reason
            assert name in text
        assert "cuda" in d.skipped["sdpa_cudnn"]
    d = explain(q, k, v, causal=True)
    assert d.backend == "sdpa_flash" and set(d.skipped) == set(attnzoo.ops.backend_names()) - {"sdpa_flash"}
