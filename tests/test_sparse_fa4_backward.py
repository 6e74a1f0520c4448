"""The band backward through FlashAttention-4 (attnzoo.ops.sparse.fa4_backward).

On CPU: when it applies (every reason it declines), the adapter (layouts, base-2 -> natural log-sum-exp, window
bounds, grouped heads) against float64 autograd through a stand-in that implements FlashAttention's backward
contract, the one-time fallback when FlashAttention raises, and the Triton backward's hand-over (Triton's
interpreter). On a Hopper GPU with flash-attn-4 installed (``gpu`` marker): the real kernels against float64, and
each way of switching them off. Without flash-attn-4 the GPU tests skip; the other GPU tests then cover the Triton
backward.
"""
import types
import warnings

import pytest
import torch

from attnzoo.ops import sparse_attention
from attnzoo.ops.sparse import SlidingWindow, fa4_backward
from attnzoo.ops.sparse.fa4_backward import band_backward_reason, fa4_backward_reason, fa4_band_backward

GOOD = {"band": True, "n_global": 0, "has_padding": False, "device_type": "cuda", "capability": (9, 0),
        "dtype": torch.bfloat16, "head_dim": 64, "lo": -256, "hi": 256, "deterministic": False, "env": None}


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(fa4_backward, "_state", {})
    monkeypatch.setattr(fa4_backward, "_direct", {})


def test_reason_is_none_for_a_plain_band_on_hopper():
    assert band_backward_reason(**GOOD) is None
    assert band_backward_reason(**{**GOOD, "hi": 0, "dtype": torch.float16, "head_dim": 128}) is None


@pytest.mark.parametrize("change, words", [
    ({"env": "0"}, "ATTNZOO_SPARSE_FA4=0"),
    ({"band": False}, "not a pure band"),
    ({"n_global": 1}, "global tokens"),
    ({"has_padding": True}, "key padding"),
    ({"device_type": "cpu"}, "device cpu"),
    ({"capability": (8, 0)}, "compute capability (8, 0)"),
    ({"capability": (10, 0)}, "compute capability (10, 0)"),
    ({"dtype": torch.float32}, "dtype torch.float32"),
    ({"head_dim": 12}, "head_dim 12"),
    ({"head_dim": 512}, "head_dim 512"),
    ({"lo": 3, "hi": 9}, "band 3..9"),
    ({"deterministic": True}, "use_deterministic_algorithms"),
], ids=lambda x: str(x) if isinstance(x, str) else "-".join(x))
def test_reason_names_what_declines(change, words):
    assert words in band_backward_reason(**{**GOOD, **change})


def test_reason_for_a_cpu_tensor_does_not_import_flash_attention():
    assert fa4_backward_reason(torch.zeros(1, 1, 4, 8), band=True, n_global=0, lo=-1, hi=1,
                               has_padding=False) == "device cpu (needs CUDA)"
    assert fa4_backward._state == {}


def test_which_band_backward_names_the_path(monkeypatch):
    from attnzoo.ops.sparse import BigBird, Longformer

    q = torch.zeros(1, 2, 40, 8)
    assert fa4_backward.which_band_backward(q, BigBird(block_size=8)) == "attnzoo (not a band pattern)"
    assert fa4_backward.which_band_backward(q, SlidingWindow(window=4)) == "attnzoo (device cpu (needs CUDA))"
    seen = {}

    def reason(q, **facts):
        seen.update(facts)
        return None
    monkeypatch.setattr(fa4_backward, "fa4_backward_reason", reason)
    assert fa4_backward.which_band_backward(q, SlidingWindow(window=4, causal=True)) == "flash_attn.cute"
    assert seen == {"band": True, "n_global": 0, "lo": -4, "hi": 0, "has_padding": False}
    fa4_backward.which_band_backward(q, Longformer(window=4, global_tokens=(0, 7)), torch.ones(1, 40, dtype=bool))
    assert seen["n_global"] == 2 and seen["has_padding"]


def _band_keep(n, left, right):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j >= i - left) & (j <= i + right)


def _fake_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, window_size_left, window_size_right,
                         dq=None, dk=None, dv=None):
    """FlashAttention's backward contract in float64: ``[B, N, H, D]`` tensors (k, v with Hkv heads), ``lse``
    ``[B, H, N]`` natural log, keys ``i - left <= j <= i + right``; writes dq, dk, dv into the given tensors (same
    shapes as q, k, v; any strides) and returns them."""
    assert not causal
    qh, kh, vh, oh, doh = (x.transpose(1, 2).double() for x in (q, k, v, out, dout))
    g = qh.shape[1] // kh.shape[1]
    kr, vr = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    keep = _band_keep(qh.shape[2], window_size_left, window_size_right)
    s = qh @ kr.transpose(-1, -2) * softmax_scale
    p = torch.where(keep, torch.exp(s - lse.double()[..., None]), 0.0)
    dv_ = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vr.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    dq_ = ds @ kr * softmax_scale
    dk_ = ds.transpose(-1, -2) @ qh * softmax_scale
    b, h, n, d = dk_.shape
    dk_, dv_ = (x.view(b, h // g, g, n, d).sum(2) for x in (dk_, dv_))
    outs = []
    for given, x in zip((dq, dk, dv), (dq_, dk_, dv_)):
        given.copy_(x.transpose(1, 2))
        outs.append(given)
    return tuple(outs)


@pytest.mark.parametrize("lo, hi", [(-5, 5), (-7, 0), (-3, 11)], ids=["bidirectional", "causal", "asymmetric"])
def test_adapter_matches_float64_autograd(monkeypatch, lo, hi):
    """``fa4_band_backward`` hands FlashAttention its layout, the LSE and window bounds, and returns the gradients
    in attnzoo's layout: through the stand-in they equal float64 autograd (grouped heads, odd length)."""
    monkeypatch.setattr(fa4_backward, "_state", {"module": types.SimpleNamespace(_flash_attn_bwd=_fake_flash_attn_bwd)})
    torch.manual_seed(0)
    b, h, hk, n, d, scale = 2, 4, 2, 37, 8, 0.3
    q = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hk, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hk, n, d, dtype=torch.float64, requires_grad=True)
    keep = _band_keep(n, -lo, hi)
    s = q @ k.repeat_interleave(h // hk, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~keep, float("-inf"))
    o = torch.softmax(s, -1) @ v.repeat_interleave(h // hk, 1)
    lse = torch.logsumexp(s, -1).detach()  # natural log, as FlashAttention reads it
    do = torch.randn_like(o)
    want = torch.autograd.grad(o, (q, k, v), do)
    got = fa4_band_backward(q.detach(), k.detach(), v.detach(), o.detach(), do, lse, scale, lo, hi)
    for name, a, w in zip("qkv", got, want):
        assert a.shape == w.shape and a.is_contiguous(), name
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_a_failing_flash_attention_warns_once_and_is_not_called_again(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise TypeError("unexpected keyword argument 'window_size_left'")
    monkeypatch.setattr(fa4_backward, "_state", {"module": types.SimpleNamespace(_flash_attn_bwd=broken)})
    x = torch.zeros(1, 2, 8, 8)
    lse = torch.zeros(1, 2, 8)
    with pytest.warns(RuntimeWarning, match="window_size_left.*attnzoo's own kernels.*ATTNZOO_SPARSE_FA4=0"):
        assert fa4_band_backward(x, x, x, x, x, lse, 1.0, -2, 2) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fa4_band_backward(x, x, x, x, x, lse, 1.0, -2, 2) is None
    assert len(calls) == 1
    assert "failed once (TypeError" in fa4_backward._state["failed"]


def test_missing_flash_attention_is_a_reason(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_flash(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise ImportError("No module named 'flash_attn'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_flash)
    monkeypatch.setattr(fa4_backward, "_installed", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not installed: no warning, attnzoo's kernels are the default
        assert fa4_backward._interface() is None
    assert "flash_attn.cute does not import (ImportError" in fa4_backward._state["failed"]
    fa4_backward._state.clear()
    monkeypatch.setattr(fa4_backward, "_installed", lambda: True)  # installed but broken: one warning
    with pytest.warns(RuntimeWarning, match="flash-attn-4 is installed but flash_attn.cute does not import"):
        assert fa4_backward._interface() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fa4_backward._interface() is None  # remembered, not retried


def test_triton_backward_hands_a_band_over_and_takes_its_own_path_on_none(monkeypatch):
    """Where the reason is None, the ``triton`` backend's forward writes the natural-log LSE and its backward
    returns what ``fa4_band_backward`` gives; when that gives None, the backward converts the LSE back to base 2
    and runs its own kernels (Triton's interpreter on CPU; stand-ins for FlashAttention)."""
    pytest.importorskip("triton")
    from attnzoo.ops.sparse import triton_kernel
    if not triton_kernel.interpreted() and not torch.cuda.is_available():
        pytest.skip("the kernel module was imported without TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() and not triton_kernel.interpreted() else "cpu"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 45, 16, device=dev, requires_grad=True) for _ in range(3))
    pattern = SlidingWindow(window=6, causal=True)
    go = torch.randn(1, 2, 45, 16, device=dev)
    own = torch.autograd.grad(sparse_attention(q, k, v, pattern, tile=32, backend="triton"), (q, k, v), go)
    seen = {}

    def stand_in(*args):
        seen["args"] = args
        return tuple(torch.full_like(t, i + 1.0) for i, t in enumerate(args[:3]))
    monkeypatch.setattr(triton_kernel, "fa4_backward_reason", lambda *a, **kw: None)
    monkeypatch.setattr(triton_kernel, "fa4_band_backward", stand_in)
    got = torch.autograd.grad(sparse_attention(q, k, v, pattern, tile=32, backend="triton"), (q, k, v), go)
    assert [float(g.unique()) for g in got] == [1.0, 2.0, 3.0]
    *_, do, lse, scale, lo, hi = seen["args"]
    assert (lo, hi) == (-6, 0) and scale == pytest.approx(0.25) and torch.equal(do, go)
    i, j = torch.arange(45)[:, None], torch.arange(45)[None, :]
    scores = (q.detach().double() @ k.detach().double().transpose(-1, -2) * 0.25).cpu()
    want_lse = torch.logsumexp(scores.masked_fill(~((i - j >= 0) & (i - j <= 6)), float("-inf")), -1)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-4, atol=1e-4)  # natural log
    monkeypatch.setattr(triton_kernel, "fa4_band_backward", lambda *args: None)
    again = torch.autograd.grad(sparse_attention(q, k, v, pattern, tile=32, backend="triton"), (q, k, v), go)
    for a, b in zip(again, own):
        torch.testing.assert_close(a, b)


# -- the replay of FlashAttention-4's compiled kernels (CPU, a stand-in with its internals' shape) ---------------


class _Compiled:
    """A stand-in compiled kernel: counts its calls; ``broken`` makes it raise, ``wrong`` writes garbage (both only
    when called directly, i.e. replayed, not from the wrapper)."""

    def __init__(self, fn, fa):
        self.fn, self.fa, self.calls, self.broken, self.wrong = fn, fa, 0, False, False

    def __call__(self, *args):
        self.calls += 1
        if self.broken and not self.fa.inside:
            raise TypeError("simulated argument mismatch")
        self.fn(*args, wrong=self.wrong and not self.fa.inside)


def _fake_interface():
    """A module shaped like ``flash_attn.cute.interface`` 4.0.0b36: ``_flash_attn_bwd`` allocates three float32
    buffers and runs three compiled kernels found in the compile caches of ``_bwd_preprocess``, itself and
    ``_bwd_postprocess_convert`` (float64 maths in FlashAttention's ``[B, N, H, D]`` layout)."""
    log2e = 1.4426950408889634

    def pre(out, dout, dpsum, lse, lse_log2, dq_accum, cu, su, dlse, wrong=False):
        dpsum.copy_((out.double() * dout.double()).sum(-1).transpose(1, 2))
        lse_log2.copy_(lse * log2e)
        dq_accum.zero_()

    def main(q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv, scale, left, right, aux, wrong=False):
        qh, kh, vh, doh = (x.transpose(1, 2).double() for x in (q, k, v, dout))
        b, h, n, d = qh.shape
        g = h // kh.shape[1]
        kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        s = qh @ kh.transpose(-1, -2) * scale
        p = torch.where(_band_keep(n, left, right), torch.exp2(s * log2e - lse_log2.double()[..., None]), 0.0)
        ds = p * (doh @ vh.transpose(-1, -2) - dpsum.double()[..., None])
        dq_accum.view(qh.shape).add_(ds @ kh)  # unscaled, as the postprocess scales it
        dk.copy_((ds.transpose(-1, -2) @ qh * scale).view(b, h // g, g, n, d).sum(2).transpose(1, 2))
        dv.copy_((p.transpose(-1, -2) @ doh).view(b, h // g, g, n, d).sum(2).transpose(1, 2) + (1.0 if wrong else 0))

    def post(dq_accum, dq, scale, wrong=False):
        dq.copy_((dq_accum.view(dq.shape[0], dq.shape[2], dq.shape[1], dq.shape[3]) * scale).transpose(1, 2))

    fa = types.SimpleNamespace(inside=False)
    kernels = {"pre": _Compiled(pre, fa), "main": _Compiled(main, fa), "post": _Compiled(post, fa)}

    def _bwd_preprocess(*args):
        if "pre" not in _bwd_preprocess.compile_cache:
            _bwd_preprocess.compile_cache["pre"] = kernels["pre"]
        _bwd_preprocess.compile_cache["pre"](*args)

    def _bwd_postprocess_convert(*args):
        if "post" not in _bwd_postprocess_convert.compile_cache:
            _bwd_postprocess_convert.compile_cache["post"] = kernels["post"]
        _bwd_postprocess_convert.compile_cache["post"](*args)

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, window_size_left, window_size_right,
                        dq, dk, dv):
        fa.wrapper_calls += 1
        fa.inside = True
        b, n, h, d = q.shape
        dq_accum = torch.empty(b, h, n * d, dtype=torch.float32)
        dpsum, lse_log2 = (torch.empty(b, h, n, dtype=torch.float32) for _ in range(2))
        _bwd_preprocess(out, dout, dpsum, lse, lse_log2, dq_accum, None, None, None)
        if "main" not in _flash_attn_bwd.compile_cache:
            _flash_attn_bwd.compile_cache["main"] = kernels["main"]
        _flash_attn_bwd.compile_cache["main"](q.detach(), k.detach(), v.detach(), dout, lse_log2, dpsum, dq_accum,
                                              dk, dv, softmax_scale, window_size_left, window_size_right, None)
        _bwd_postprocess_convert(dq_accum, dq, softmax_scale)
        fa.inside = False
        return dq, dk, dv

    for f in (_bwd_preprocess, _flash_attn_bwd, _bwd_postprocess_convert):
        f.compile_cache = {}
        setattr(fa, f.__name__, f)
    fa.wrapper_calls, fa.kernels = 0, kernels
    return fa


def _band_case(seed, n=29, h=3, hk=3, d=8, lo=-4, hi=6, scale=0.35):
    """Float64 band attention: (q, k, v, o, lse natural log, dO, the gradients by autograd)."""
    torch.manual_seed(seed)
    q = torch.randn(2, h, n, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hk, n, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s = (q @ k.repeat_interleave(h // hk, 1).transpose(-1, -2) * scale).masked_fill(~_band_keep(n, -lo, hi),
                                                                                     float("-inf"))
    o = torch.softmax(s, -1) @ v.repeat_interleave(h // hk, 1)
    do = torch.randn_like(o)
    return (q.detach(), k.detach(), v.detach(), o.detach(), torch.logsumexp(s, -1).detach(), do,
            torch.autograd.grad(o, (q, k, v), do), scale, lo, hi)


@pytest.fixture
def fake_fa(monkeypatch):
    fa = _fake_interface()
    monkeypatch.setattr(fa4_backward, "_state", {"module": fa})
    monkeypatch.setattr(fa4_backward, "_version", lambda: "4.0.0b36")
    monkeypatch.delenv("ATTNZOO_SPARSE_FA4_DIRECT", raising=False)
    return fa


def _backward(case):
    q, k, v, o, lse, do, want, scale, lo, hi = case
    got = fa4_band_backward(q, k, v, o, do, lse, scale, lo, hi)
    for name, a, w in zip("qkv", got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_later_calls_replay_the_compiled_kernels(fake_fa):
    """The first call per signature goes through the wrapper (and one replay that checks it); later calls of
    that signature run the three compiled kernels directly, each with fresh buffers, and stay exact."""
    for seed in range(3):
        _backward(_band_case(seed))
    assert fake_fa.wrapper_calls == 1
    assert [kn.calls for kn in fake_fa.kernels.values()] == [4, 4, 4]  # 1 wrapper + 1 check + 2 replays
    (replay,) = fa4_backward._direct.values()
    assert isinstance(replay, fa4_backward._Replay) and len(replay.shapes) == 3
    _backward(_band_case(3, n=31))  # another length: another signature, through the wrapper first
    assert fake_fa.wrapper_calls == 2


@pytest.mark.parametrize("how", ["grouped heads", "switched off", "other version", "wrong", "broken"])
def test_the_wrapper_serves_what_cannot_be_replayed(fake_fa, monkeypatch, how):
    hk = 1 if how == "grouped heads" else 3
    if how == "switched off":
        monkeypatch.setenv("ATTNZOO_SPARSE_FA4_DIRECT", "0")
    if how == "other version":
        monkeypatch.setattr(fa4_backward, "_version", lambda: "4.0.1")
    if how in ("wrong", "broken"):
        setattr(fake_fa.kernels["main"], how, True)
        with pytest.warns(RuntimeWarning, match="replaying FlashAttention-4's compiled backward failed"):
            _backward(_band_case(0, hk=hk))
    else:
        _backward(_band_case(0, hk=hk))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for seed in (1, 2):
            _backward(_band_case(seed, hk=hk))
    assert fake_fa.wrapper_calls == 3
    (why,) = fa4_backward._direct.values()
    assert isinstance(why, str) and {"grouped heads": "grouped KV heads", "switched off": "switched off",
                                     "other version": "4.0.1", "wrong": "did not reproduce",
                                     "broken": "simulated argument mismatch"}[how] in why


def test_a_replay_that_raises_later_hands_the_shape_back_to_the_wrapper(fake_fa):
    _backward(_band_case(0))
    fake_fa.kernels["pre"].broken = True
    with pytest.warns(RuntimeWarning, match="its replay raised TypeError"):
        _backward(_band_case(1))
    _backward(_band_case(2))
    assert fake_fa.wrapper_calls == 3


# -- GPU: the real FlashAttention-4 kernels ---------------------------------------------------------------------


def _fa4_here() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability()[0] != 9:
        return "needs a Hopper GPU"
    if fa4_backward._interface() is None:
        return fa4_backward._state["failed"]
    return None


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(pattern, dtype, n, hq=8, hkv=4, d=64, kpm=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(2, hq, n, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, hkv, n, d, device="cuda", dtype=dtype, requires_grad=True)
    out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, backend="triton")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_attention(q64, k64, v64, pattern, key_padding_mask=kpm, backend="reference")
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), go.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), go)
    return {name: _rel(a, b) for name, a, b in zip("qkv", got, want)}


@pytest.fixture
def fa4_calls(monkeypatch):
    """Counts the calls that reach FlashAttention-4 (skips the test where it cannot run)."""
    monkeypatch.setattr(fa4_backward, "_state", {})
    why = _fa4_here()
    if why is not None:
        pytest.skip(f"FlashAttention-4's backward is not usable here: {why}")
    from attnzoo.ops.sparse import triton_kernel
    calls = []
    real = triton_kernel.fa4_band_backward

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(triton_kernel, "fa4_band_backward", counting)
    monkeypatch.delenv("ATTNZOO_SPARSE_FA4", raising=False)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("window, causal, n, dtype", [
    (100, False, 999, torch.bfloat16), (100, True, 999, torch.bfloat16), (256, False, 4096, torch.bfloat16),
    (256, True, 1500, torch.float16), (31, False, 333, torch.float16),
], ids=["w100-full-999-bf16", "w100-causal-999-bf16", "w256-full-4096-bf16", "w256-causal-1500-fp16",
        "w31-full-333-fp16"])
def test_fa4_backward_matches_float64(fa4_calls, window, causal, n, dtype):
    errs = _run(SlidingWindow(window=window, causal=causal), dtype, n)
    assert len(fa4_calls) == 1
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.gpu
def test_fa4_replay_matches_float64_on_later_calls(fa4_calls):
    """Without grouped heads, calls after the first of a shape replay FlashAttention-4's compiled kernels
    (``fa4_backward._Replay``): still against float64, on fresh inputs each time."""
    pattern = SlidingWindow(window=100)
    for seed in range(3):
        errs = _run(pattern, torch.bfloat16, 999, hq=4, hkv=4, seed=seed)
        assert max(errs.values()) < 1e-2, errs
    assert len(fa4_calls) == 3
    assert [type(r).__name__ for r in fa4_backward._direct.values()] == ["_Replay"], fa4_backward._direct


@pytest.mark.gpu
def test_fa4_backward_switches_off(fa4_calls, monkeypatch):
    """ATTNZOO_SPARSE_FA4=0, deterministic algorithms and key padding keep the backward on attnzoo's kernels,
    which match float64 too."""
    pattern = SlidingWindow(window=64)
    monkeypatch.setenv("ATTNZOO_SPARSE_FA4", "0")
    assert max(_run(pattern, torch.bfloat16, 500).values()) < 1e-2
    monkeypatch.delenv("ATTNZOO_SPARSE_FA4")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert max(_run(pattern, torch.bfloat16, 500).values()) < 1e-2
    finally:
        torch.use_deterministic_algorithms(False)
    kpm = torch.ones(2, 500, dtype=torch.bool, device="cuda")
    kpm[1, 450:] = False
    assert max(_run(pattern, torch.bfloat16, 500, kpm=kpm).values()) < 1e-2
    assert fa4_calls == []
    assert max(_run(pattern, torch.bfloat16, 500).values()) < 1e-2
    assert len(fa4_calls) == 1


@pytest.mark.gpu
def test_fa4_failure_falls_back_with_a_warning(fa4_calls, monkeypatch):
    interface = fa4_backward._interface()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")
    monkeypatch.setattr(interface, "_flash_attn_bwd", broken)
    with pytest.warns(RuntimeWarning, match="simulated launch failure"):
        errs = _run(SlidingWindow(window=64), torch.bfloat16, 500)
    assert max(errs.values()) < 1e-2
