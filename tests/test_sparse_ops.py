"""attnzoo.ops.sparse_attention: every CPU backend against the float64 oracle; dispatch, forcing, explain."""
import pytest
import torch

from attnzoo.errors import BackendUnavailableError
from attnzoo.ops import explain_sparse, last_sparse_decision, sparse_attention, use_sparse_backend
from attnzoo.ops.sparse import BigBird, Longformer, SlidingWindow

from oracle import naive_attention
from test_sparse_patterns import CASES

GRAD_BACKENDS = ["gather", "masked", "reference"]


def _qkv(b=2, hq=4, hkv=2, nq=37, nk=37, d=8):
    return [torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
            for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]


def _padding(kind, b, n):
    if kind == "none":
        return None
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, n - 5:] = False  # right padding
    kpm[-1, :4] = False  # left padding
    return kpm


def _check_grads(out, ref, inputs, rtol=1e-8):
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, go)
    want = torch.autograd.grad(ref, inputs, go)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", GRAD_BACKENDS + ["flex"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", ["none", "padding"])
@pytest.mark.parametrize("n, tile", [(37, 8), (33, 16)], ids=["n37t8", "n33t16"])
def test_backend_matches_oracle(backend, case, causal, padding, n, tile):
    make, loops = CASES[case]
    q, k, v = _qkv(nq=n, nk=n)
    kpm = _padding(padding, 2, n)
    ref = naive_attention(q, k, v, mask=loops(n, causal), key_padding_mask=kpm)
    if backend == "flex":  # no CPU backward: forward only here, the GPU tests cover the rest
        out = sparse_attention(q.detach(), k.detach(), v.detach(), make(causal), key_padding_mask=kpm, tile=tile,
                               backend="flex")
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        return
    out = sparse_attention(q, k, v, make(causal), key_padding_mask=kpm, tile=tile, backend=backend)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert last_sparse_decision().backend == backend and last_sparse_decision().forced
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    _check_grads(out, ref, (q, k, v))


@pytest.mark.parametrize("backend", ["masked", "reference"])
@pytest.mark.parametrize("case", ["sliding", "longformer", "bigbird", "strided", "fixed"])
@pytest.mark.parametrize("nq", [1, 5])
def test_decoding_rows_match_oracle(backend, case, nq):
    """q_len < k_len: the queries are the last positions (bottom-right aligned)."""
    make, loops = CASES[case]
    n = 40
    q, k, v = _qkv(nq=nq, nk=n)
    kpm = _padding("padding", 2, n)
    ref = naive_attention(q, k, v, mask=loops(n, True)[n - nq:], key_padding_mask=kpm)
    out = sparse_attention(q, k, v, make(True), key_padding_mask=kpm, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    _check_grads(out, ref, (q, k, v))


def test_dispatch_on_cpu_and_explain():
    q, k, v = (t.detach() for t in _qkv())
    p = SlidingWindow(window=3)
    d = explain_sparse(q, k, v, p)
    assert d.backend == "gather" and not d.forced
    sparse_attention(q, k, v, p)
    assert last_sparse_decision().backend == "gather" and last_sparse_decision().cached
    d = explain_sparse(q[:, :, -1:], k, v, p)  # decoding goes to the dense-masked path
    assert d.backend == "masked" and "q_len == k_len" in d.rejected["gather"]
    assert "masked" in str(d)


def test_forcing_never_falls_back():
    q, k, v = _qkv()
    p = Longformer(window=2, global_tokens=1)
    with pytest.raises(BackendUnavailableError, match="flex.*no backward off CUDA"):
        sparse_attention(q, k, v, p, backend="flex")
    with pytest.raises(BackendUnavailableError, match="gather.*q_len == k_len"):
        sparse_attention(q[:, :, :3], k, v, p, backend="gather")
    with pytest.raises(BackendUnavailableError, match="flex.*dropout"):
        sparse_attention(q.detach(), k.detach(), v.detach(), p, dropout_p=0.1, backend="flex")
    with use_sparse_backend("reference"):
        sparse_attention(q, k, v, p)
        assert last_sparse_decision().backend == "reference" and last_sparse_decision().forced
    with use_sparse_backend("flex", "masked"):  # a priority list
        sparse_attention(q, k, v, p)
        assert last_sparse_decision().backend == "masked"
        assert "no backward" in last_sparse_decision().rejected["flex"]
    with pytest.raises(ValueError, match="backend='gathr'.*Did you mean 'gather'"):
        sparse_attention(q, k, v, p, backend="gathr")


def test_global_rows_false_leaves_them_to_the_caller():
    q, k, v = _qkv()
    p = Longformer(window=2, global_tokens=(0, 17))
    for backend in ("gather", "masked", "reference"):
        out = sparse_attention(q, k, v, p, global_rows=False, backend=backend)
        assert out[:, :, [0, 17]].abs().max() == 0
        full = sparse_attention(q, k, v, p, backend=backend)
        keep = torch.ones(37, dtype=torch.bool)
        keep[[0, 17]] = False
        torch.testing.assert_close(out[:, :, keep], full[:, :, keep])


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_fully_padded_rows_are_zero_with_finite_grads(backend):
    q, k, v = _qkv(nq=20, nk=20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False  # the whole second sequence is padding
    out = sparse_attention(q, k, v, SlidingWindow(window=2), key_padding_mask=kpm, tile=8, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dropout_only_in_backends_that_have_it():
    q, k, v = (t.detach().float() for t in _qkv())
    p = BigBird(block_size=4, window=4, random_blocks=1)
    a = sparse_attention(q, k, v, p, dropout_p=0.5, tile=8)
    b = sparse_attention(q, k, v, p, tile=8)
    assert not torch.allclose(a, b)


def test_float32_and_scale():
    q, k, v = (t.detach().float() for t in _qkv())
    p = SlidingWindow(window=4, causal=True)
    out = sparse_attention(q, k, v, p, scale=0.3)
    from oracle import sliding_keep
    ref = naive_attention(q, k, v, mask=sliding_keep(37, 4, True), scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(pattern="sliding"), TypeError, "pattern='sliding': expected an attnzoo.ops.sparse Pattern"),
    (dict(tile=0), ValueError, "tile=0: expected an integer >= 1"),
    (dict(q=torch.randn(1, 2, 9, 8)), ValueError, "q_len <= k_len"),
    (dict(key_padding_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "key_padding_mask has shape"),
    (dict(kernel_options=3), TypeError, "kernel_options=3"),
])
def test_bad_arguments_raise_clearly(kw, exc, msg):
    args = dict(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8),
                pattern=SlidingWindow(window=2))
    args.update(kw)
    with pytest.raises(exc, match=msg):
        sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("pattern"), **args)
