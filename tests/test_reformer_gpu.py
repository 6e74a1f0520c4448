"""GPU: the fused LSH kernels (Triton, compiled) in bf16/fp16/fp32 against the float64 reference (the torch backend
in float64: tests/test_reformer_ops.py shows it equals the pair-by-pair reference), forward and backward; odd lengths,
padding, chunk sizes that are not powers of two; CUDA-graph capture of a whole call; the module and a converted
llama on CUDA; what the default backend is.

Run on a GPU machine: ``python -m pytest -m gpu -q -rs tests/test_reformer_gpu.py``. Skipped without CUDA.
"""
import pytest
import torch

import attnzoo
from attnzoo.ops.lsh import hash_keys, hash_queries, hash_vectors, lsh_attention
from attnzoo.ops.lsh.op import TRITON_FP32_GRAD_MAX_BUCKET
from attnzoo.variants.reformer import shared_keys

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 5e-3}  # ‖out − ref‖ / ‖ref‖ (fp32: TF32 dots)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(dtype, shared, n, b=2, h=4, d=64, rounds=4, bucket=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    nb = max(2, -(-n // bucket) + (-(-n // bucket)) % 2)
    if shared:
        qb, kb = hash_vectors(q.detach(), rounds, nb, seed), None
    else:
        qb, kb = hash_queries(q.detach(), rounds, nb, seed), hash_keys(k.detach(), rounds, nb, seed, causal=False)
    return q, k, v, qb, kb


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_qk", "separate_qk"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n,bucket", [(1000, 64), (777, 48), (300, 128)])
def test_triton_kernels_match_float64(dtype, shared, causal, n, bucket):
    q, k, v, qb, kb = _case(dtype, shared, n, bucket=bucket)
    kpm = torch.ones(2, n, dtype=torch.bool, device="cuda")
    kpm[1, n - n // 5:] = False
    scale = 1.0 if shared else None

    def run(backend, cast):
        qq, kk, vv = (t.detach().to(cast).requires_grad_() for t in (q, k, v))
        keys = shared_keys(qq) if shared else kk
        out = lsh_attention(qq, keys, vv, qb, kb, bucket_size=bucket, causal=causal, key_padding_mask=kpm,
                            scale=scale, backend=backend)
        go = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        grads = torch.autograd.grad(out, (qq, vv) if shared else (qq, kk, vv), go.to(out.dtype))
        return out, grads

    if dtype == torch.float32 and bucket > TRITON_FP32_GRAD_MAX_BUCKET:  # the float32 backward does not fit
        with pytest.raises(ValueError, match=f"bucket_size={bucket}"):
            run("triton", dtype)
        out, grads = run(None, dtype)  # the dispatcher's choice: the torch backend
    else:
        out, grads = run("triton", dtype)
    ref, rgrads = run("torch", torch.float64)
    assert _rel(out, ref) < TOL[dtype]
    for a, r in zip(grads, rgrads):
        assert _rel(a, r) < 3 * TOL[dtype]


def test_default_backend_on_cuda_is_triton_and_a_call_captures_in_a_cuda_graph():
    from attnzoo.ops.lsh import op

    q, k, v, qb, kb = _case(torch.bfloat16, False, 2048)
    assert op._backend(q, None) == "triton"
    with torch.no_grad():
        lsh_attention(q, k, v, qb, kb, bucket_size=64)  # compile outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            lsh_attention(q, k, v, qb, kb, bucket_size=64)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lsh_attention(q, k, v, qb, kb, bucket_size=64)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, lsh_attention(q, k, v, qb, kb, bucket_size=64))


@pytest.mark.parametrize("shared_qk", [True, False])
def test_the_module_on_cuda_matches_the_cpu_float64_module(shared_qk, monkeypatch):
    """The fused module path (CUDA, fp32) against the float64 module on the CPU, given the same buckets: hashing
    is content-dependent, so a near-tie in a rotated coordinate (gap ~1e-6) can land a token in another bucket in
    fp32 than in fp64 and change whole chunks; the buckets of the float64 run are replayed in the CUDA run, and
    the fp32 hashes themselves are checked to agree with the float64 ones for all but a handful of vectors."""
    from attnzoo.variants import reformer as mod

    m = attnzoo.create("reformer", dim=256, heads=4, num_hashes=4, bucket_size=64, causal=True, rope=True,
                       shared_qk=shared_qk).double()
    x = torch.randn(2, 700, 256, dtype=torch.float64)
    calls, real = [], mod.lsh_buckets

    def recording(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(mod, "lsh_buckets", recording)
    want = m(x)
    monkeypatch.setattr(mod, "lsh_buckets", lambda *a, **k: (recording(*a, **k), tuple(
        None if t is None else t.cuda() for t in calls[0]))[1])
    got = m.cuda().float()(x.cuda().float())
    assert len(calls) == 2
    assert _rel(got.cpu(), want) < 1e-3
    for fp32, fp64 in zip(calls[1], calls[0]):
        if fp64 is not None:
            assert (fp32.cpu() != fp64).float().mean().item() < 1e-3  # near-ties only


def test_a_converted_llama_generates_on_cuda():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = tf.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    attnzoo.patch(model, "reformer", num_hashes=4, bucket_size=64)
    ids = torch.randint(3, 512, (2, 600), device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 608)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_hash_kernel_agrees_with_the_gemm_and_argmax(dtype):
    x = torch.randn(1, 12, 16384, 64, device="cuda", dtype=dtype)
    want = hash_vectors(x, 4, 256, seed=0, backend="torch")
    got = hash_vectors(x, 4, 256, seed=0)  # the default on CUDA: the fused kernel
    assert (got == want).float().mean().item() > 0.98  # near-ties fall either way (TF32 or bf16 dots)
    e = torch.rand(1, 12, 16384, device="cuda")  # SMYRF's extra coordinate, beside x (float32 hashing)
    want = hash_vectors(x, 4, 256, seed=0, backend="torch", extra=e)
    assert (hash_vectors(x, 4, 256, seed=0, extra=e) == want).float().mean().item() > 0.98


@pytest.mark.parametrize("shared", [True, False], ids=["shared_qk", "separate_qk"])
def test_the_benchmark_shape_matches_float64(shared):
    """The bench's shape (N=16384, 12 heads, d 64, 4 rounds, chunks of 64, bf16) on strided views of one
    projection (what the kernels read in place), 4 query heads per KV head for separate QK: forward and gradients
    against the torch backend in float64."""
    n, h = 16384, 12
    hk = h if shared else 3
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1, n, (h + 2 * hk) * 64, device="cuda", generator=g).to(torch.bfloat16)
    nb = 256

    def run(backend, dtype):
        ww = w.detach().to(dtype).requires_grad_()
        q, k, v = (t.unflatten(-1, (-1, 64)).transpose(1, 2) for t in ww.split([h * 64, hk * 64, hk * 64], -1))
        if shared:
            qb, kb = hash_vectors(q.detach().float(), 4, nb, 0), None
            k = shared_keys(q)
        else:
            qb = hash_queries(q.detach().float(), 4, nb, 0)
            kb = hash_keys(k.detach().float(), 4, nb, 0, causal=True)
        out = lsh_attention(q, k, v, qb, kb, bucket_size=64, causal=not shared, scale=1.0 if shared else None,
                            backend=backend)
        go = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        return out, torch.autograd.grad(out, ww, go.to(out.dtype))[0]

    out, grad = run("triton", torch.bfloat16)
    ref, rgrad = run("torch", torch.float64)
    assert _rel(out, ref) < TOL[torch.bfloat16]
    assert _rel(grad, rgrad) < 3 * TOL[torch.bfloat16]


def test_a_compiled_training_step_equals_eager_and_replays_from_a_cuda_graph():
    """torch.compile(fullgraph=True) over the hash, the sort and the fused op (the custom ops ``attnzoo::lsh_hash``,
    ``lsh_fwd``, ``lsh_bwd``), forward and backward, equal to eager; then the eager forward+backward captured in a
    CUDA graph."""
    q, k, v, qb, kb = _case(torch.bfloat16, False, 2048)

    def f(q, k, v):
        qb = hash_queries(q.detach(), 4, 32, 0)
        kb = hash_keys(k.detach(), 4, 32, 0, causal=True)
        return lsh_attention(q, k, v, qb, kb, bucket_size=64, causal=True)

    want = f(q, k, v)
    gw = torch.autograd.grad(want.float().sum(), (q, k, v))
    got = torch.compile(f, fullgraph=True)(q, k, v)
    gg = torch.autograd.grad(got.float().sum(), (q, k, v))
    assert _rel(got, want) < 1e-2
    for a, b in zip(gg, gw):
        assert _rel(a, b) < 1e-2

    # fresh leaves for the capture, first used on the warm-up stream: the leaves above were first used on the
    # default stream, and autograd keeps that stream for their gradient nodes, so a capture through them makes the
    # legacy stream wait on the capturing one ("operation would make the legacy stream depend on a capturing
    # blocking stream"; pytorch/pytorch#180090): a property of the test's leaves, not of the op
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def step():
        return torch.autograd.grad(f(qc, kc, vc).float().sum(), (qc, kc, vc))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # torch's documented warm-up before a capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(grads, gw):
        assert _rel(a, b) < 1e-6
