"""The linear-attention op: the chunked PyTorch form and the fused Triton kernels (Triton's interpreter on CPU)
against the float64 reference, forward and backward: causal and not, odd lengths, padding, grouped KV heads,
the exponential key stabiliser, the softmax window, and the state carried across calls."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.linear.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from attnzoo.ops.linear import linear_attention, linear_attention_naive  # noqa: E402
from attnzoo.ops.linear import triton_kernel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, hq, hkv, n, f, d, gated, dtype=torch.float64, device="cpu"):
    kw = dict(dtype=dtype, device=device)
    t = dict(qf=torch.rand(b, hq, n, f, **kw), kf=torch.rand(b, hkv, n, f, **kw), v=torch.randn(b, hkv, n, d, **kw),
             q=torch.randn(b, hq, n, d, **kw), k=torch.randn(b, hkv, n, d, **kw))
    if gated:
        t["q_log"], t["k_log"] = torch.randn(b, hq, n, **kw) * 4, torch.randn(b, hkv, n, **kw) * 4
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    valid[-1, : n // 4] = False
    valid[0, n - 2:] = False
    return t, valid


CASES = [(c, g, w) for c in (False, True) for g in (False, True) for w in ((0, 5) if c else (0,))]


@pytest.mark.parametrize("causal,gated,window", CASES)
def test_chunked_matches_naive_forward_and_backward(causal, gated, window):
    t, valid = _inputs(2, 4, 2, 29, 6, 5, gated)
    leaves = {k: x.requires_grad_() for k, x in t.items()}
    got = linear_attention(**leaves, causal=causal, key_padding_mask=valid, window=window, chunk=8,
                           backend="torch")
    ref = linear_attention_naive(**leaves, causal=causal, key_padding_mask=valid, window=window)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    wrt = [x for k, x in leaves.items() if window or k not in ("q", "k", "q_log")]
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("gated,window", [(False, 0), (True, 0), (True, 7)])
def test_state_carried_across_calls(gated, window):
    """Prefill then more tokens with the returned state equals one call (what decoding relies on)."""
    t, valid = _inputs(1, 2, 1, 23, 4, 3, gated)
    full = linear_attention(**t, causal=True, key_padding_mask=valid, chunk=4)
    s = 10
    first = {k: x[:, :, :s] for k, x in t.items()}
    out1, st = linear_attention(**first, causal=True, key_padding_mask=valid[:, :s], chunk=4, return_state=True)
    rest = {k: x[:, :, s:] for k, x in t.items() if k not in ("q", "k", "q_log")}
    out2 = linear_attention(**rest, causal=True, key_padding_mask=valid[:, s:], initial_state=st, chunk=4)
    torch.testing.assert_close(torch.cat([out1, out2], 2), full, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(triton_kernel.available() is not None, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("gated,window", [(False, 0), (True, 0), (True, 9)])
def test_triton_matches_naive_forward_and_backward(gated, window):
    """The fused kernels (chunk 16, 37 tokens: a partial last chunk; 2 query heads on 1 KV head; padding)."""
    t, valid = _inputs(2, 2, 1, 37, 16, 16, gated, dtype=torch.float32, device=DEV)
    leaves = {k: x.requires_grad_() for k, x in t.items()}
    got = linear_attention(**leaves, causal=True, key_padding_mask=valid, window=window, chunk=16,
                           backend="triton")
    ref = linear_attention_naive(**{k: x.cpu() for k, x in leaves.items()}, causal=True,
                                 key_padding_mask=valid.cpu(), window=window)
    tol = dict(rtol=2e-4, atol=2e-4) if DEV == "cpu" else dict(rtol=1e-2, atol=1e-2)  # TF32 dots on a GPU
    torch.testing.assert_close(got.double().cpu(), ref, **tol)
    g = torch.randn_like(got)
    wrt = [x for k, x in leaves.items() if window or k not in ("q", "k", "q_log")]
    ga = torch.autograd.grad(got, wrt, g)
    gb = torch.autograd.grad(ref, wrt, g.double().cpu())
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double().cpu(), b.double(), **tol)


@pytest.mark.skipif(triton_kernel.available() is not None, reason="the Triton kernels cannot run here")
def test_window_q_log_gradient_does_not_inherit_the_saved_outputs_rounding(monkeypatch):
    """The window hybrid's q_log gradient, s (1 - s) (dO.o_lin - dO.o_win), vanishes as either share does; read
    off the linear pairs' sum of P dP alone it inherited the 16-bit output's rounding (through Delta = dO.o) at
    full size (bf16 on an H100: 6% off the float64 gradient). Here the backward gets the output rounded to bf16
    and the q_log gradient must stay float32-exact (the other gradients show the rounding, as FlashAttention's)."""
    t, valid = _inputs(2, 2, 1, 45, 16, 16, True, dtype=torch.float32, device=DEV)
    backward = triton_kernel._win_backward

    def rounded_out(*args):
        args = list(args)
        args[-6] = args[-6].to(torch.bfloat16).to(args[-6].dtype)  # the saved output
        return backward(*args)

    monkeypatch.setattr(triton_kernel, "_win_backward", rounded_out)
    leaves = {k: x.requires_grad_() for k, x in t.items()}
    got = linear_attention(**leaves, causal=True, key_padding_mask=valid, window=3, chunk=16, backend="triton")
    ref_leaves = {k: x.detach().cpu().double().requires_grad_() for k, x in leaves.items()}
    ref = linear_attention_naive(**ref_leaves, causal=True, key_padding_mask=valid.cpu(), window=3)
    g = torch.randn_like(got)
    a = torch.autograd.grad(got, leaves["q_log"], g)[0].double().cpu()
    b = torch.autograd.grad(ref, ref_leaves["q_log"], g.double().cpu())[0]
    tol = 1e-5 if DEV == "cpu" else 1e-2  # TF32 dots on a GPU
    assert float((a - b).norm() / b.norm()) < tol


def test_op_checks_its_arguments():
    t, valid = _inputs(1, 2, 1, 5, 4, 3, False)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(t["qf"], t["kf"], t["v"], backend="cuda")
    with pytest.raises(ValueError, match="window=3.*causal"):
        linear_attention(t["qf"], t["kf"], t["v"], window=3, q=t["q"], k=t["k"])


@pytest.mark.skipif(triton_kernel.available() is not None, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("per_head", [False, True])
def test_fused_favor_feature_rows_equal_the_torch_form(per_head):
    """FAVOR+'s feature rows on the kernel (one pass over the [.., m] rows) against favor_features' PyTorch form:
    rows, log-scales, and the gradients of x and of a learned projection (odd length, m not a multiple of the
    kernel's blocks); the rows' product (what the op uses) against float64."""
    from attnzoo.ops.linear.favor import favor_feature_rows
    from attnzoo.variants import feature_maps

    g = torch.Generator().manual_seed(3)
    b, h, n, d, m = 2, 3, 37, 16, 40
    x = torch.randn(b, h, n, d, generator=g).to(DEV).requires_grad_()
    p = (torch.randn(h, m, d, generator=g) if per_head else torch.randn(m, d, generator=g)).to(DEV).requires_grad_()
    f, log = favor_feature_rows(x, p, 0.125)
    x2, p2 = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    f2, log2 = feature_maps.favor_features_torch(x2, p2, 0.125)
    tol = dict(rtol=1e-5, atol=1e-6) if DEV == "cpu" else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(f, f2, **tol)
    torch.testing.assert_close(log, log2.float(), **tol)
    x64, p64 = x.detach().double(), p.detach().double()
    true = torch.einsum("bhnd,md->bhnm" if not per_head else "bhnd,hmd->bhnm", x64 * 0.125 ** 0.5, p64) - \
        0.5 * 0.125 * (x64 * x64).sum(-1, keepdim=True) - 0.5 * torch.log(torch.tensor(float(m), dtype=torch.float64))
    torch.testing.assert_close((f.double() * log.double()[..., None].exp()).log(), true, **tol)
    gf, gl = torch.randn_like(f), torch.randn_like(log)
    got = torch.autograd.grad((f * gf).sum() + (log * gl).sum(), [x, p])
    want = torch.autograd.grad((f2 * gf).sum() + (log2 * gl).sum(), [x2, p2])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **tol)

