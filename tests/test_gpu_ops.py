"""GPU: every fused backend against the float64 reference, bf16 and fp16, forward and backward.

Run on a GPU machine: ``python -m pytest -m gpu -q``. Skipped without CUDA.
"""
import pytest
import torch

import attnzoo
from attnzoo.errors import BackendUnavailableError
from attnzoo.ops import attention, attention_reference
from attnzoo.ops.dense.backends import BACKENDS
from attnzoo.ops.dense.call import AttentionCall

pytestmark = pytest.mark.gpu

FUSED = [n for n in BACKENDS if n not in ("eager", "sdpa_math")]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2.5e-3}  # ‖out − ref‖/‖ref‖; fp16 well under the bf16 bound


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(masks, b, hq, nq, nk, dev):
    if masks == "padding":
        kpm = torch.ones(b, nk, dtype=torch.bool, device=dev)
        kpm[0, nk - 37:] = False
        kpm[-1, :11] = False
        return {"key_padding_mask": kpm}
    if masks == "bool":
        m = torch.rand(b, 1, nq, nk, device=dev) > 0.2
        return {"mask": m}
    return {}


def _cases():
    """Full matrix for the SDPA/flash backends; flex compiles per shape, so it gets a leaner one."""
    for backend in FUSED:
        for dtype in (torch.bfloat16, torch.float16):
            for causal in (False, True):
                for masks in ("none", "padding", "bool"):
                    for heads in ((8, 8), (8, 2)):
                        for lens in ((333, 333), (5, 517), (1, 300)):
                            for head_dim in (64, 128):
                                if backend == "flex" and (dtype == torch.float16 or head_dim == 128
                                                          or lens == (1, 300)):
                                    continue
                                yield pytest.param(backend, dtype, causal, masks, heads, lens, head_dim,
                                                   id=f"{backend}-{str(dtype)[6:]}-{'causal' if causal else 'full'}-"
                                                      f"{masks}-h{heads[0]}x{heads[1]}-{lens[0]}x{lens[1]}-d{head_dim}")


@pytest.mark.parametrize("backend, dtype, causal, masks, heads, lens, head_dim", list(_cases()))
def test_fused_backend_matches_float64(backend, dtype, causal, masks, heads, lens, head_dim):
    dev = "cuda"
    hq, hkv = heads
    nq, nk = lens
    b = 2
    q = torch.randn(b, hq, nq, head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, nk, head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, nk, head_dim, device=dev, dtype=dtype, requires_grad=True)
    kw = _case(masks, b, hq, nq, nk, dev)
    reason = BACKENDS[backend].check(AttentionCall.build(q, k, v, causal=causal, **kw))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    try:
        out = attention(q, k, v, causal=causal, backend=backend, **kw)
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    ref = attention_reference(*(t.detach().double().requires_grad_() for t in (q, k, v)), causal=causal, **kw)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[dtype], _rel(out, ref)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qd, kd, vd, causal=causal, **kw)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for name, g, r in zip("qkv", grads, rgrads):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) < 2 * TOL[dtype], (name, _rel(g, r))


def test_plain_calls_are_served_by_a_fused_kernel():
    """The dispatcher must find a fused backend for the common cases (a test that can fail)."""
    for hq, hkv in ((16, 16), (32, 8)):
        for causal in (False, True):
            q = torch.randn(2, hq, 1024, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(2, hkv, 1024, 128, device="cuda", dtype=torch.bfloat16)
            d = attnzoo.ops.explain(q, k, k, causal=causal)
            assert d.backend not in ("eager", "sdpa_math"), str(d)
    kpm = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    d = attnzoo.ops.explain(q, k, k, key_padding_mask=kpm)
    assert d.backend not in ("eager", "sdpa_math"), str(d)


def test_gqa_does_not_materialize_repeated_kv():
    hq, hkv, n, D = 32, 8, 4096, 128
    q = torch.randn(1, hq, n, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for causal in (False, True):
        attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            attention(q, k, v, causal=causal)
        extra = torch.cuda.max_memory_allocated() - base
        out_bytes = q.numel() * 2
        repeated = 2 * k.numel() * 2 * (hq // hkv - 1)
        assert extra < out_bytes + repeated / 4, (extra, out_bytes, repeated, attnzoo.ops.last_decision())


@pytest.mark.parametrize("name, extra", [("mha", {}), ("gqa", {"groups": 2}), ("mqa", {})])
def test_module_bf16_matches_float64(name, extra):
    m = attnzoo.create(name, dim=256, heads=8, causal=True, rope=True, bias=True, **extra).cuda()
    x = torch.randn(2, 301, 256, device="cuda")
    ref = m.double()(x.double())
    m = m.bfloat16()
    out = m(x.bfloat16())
    assert _rel(out, ref) < 1e-2
    assert attnzoo.ops.last_decision().backend not in ("eager", "sdpa_math")


def test_decode_on_gpu_matches_full_forward():
    m = attnzoo.create("gqa", dim=256, heads=8, groups=2, causal=True, rope=True).cuda().half()
    x = torch.randn(2, 40, 256, device="cuda", dtype=torch.half)
    cache = attnzoo.variants.KVCache()
    with torch.no_grad():  # decoding: the cache writes into its preallocated buffer
        full = m(x)
        outs = [m(x[:, :17], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(17, 40)]
    assert _rel(torch.cat(outs, 1), full) < 3e-3
    assert cache.nbytes() == 2 * 2 * 2 * 256 * 32 * 2  # 2 KV heads of 32 dims, capacity 256, fp16, K and V
