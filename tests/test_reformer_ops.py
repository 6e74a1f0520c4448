"""The LSH op (attnzoo/ops/lsh): both backends against the float64 reference, forward and backward (the Triton
kernels under Triton's interpreter on CPU), shared and separate QK, causal and not, odd lengths, padding; decode rows;
hashing."""
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.lsh.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU only (see tests/test_sparse_triton.py)

from attnzoo.ops.lsh import (hash_keys, hash_queries, hash_vectors, lsh_attention, lsh_attention_reference,  # noqa: E402
                             lsh_decode, num_buckets_for)
from attnzoo.ops.lsh import triton_kernel  # noqa: E402
from attnzoo.variants.reformer import shared_keys  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_kernel.available("cpu") is None else [])


def _case(shared, n=19, b=1, h=1, hk=1, d=16, rounds=2, buckets=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, requires_grad=True)
    k = torch.randn(b, hk, n, d, generator=g, requires_grad=True)
    v = torch.randn(b, hk, n, d, generator=g, requires_grad=True)
    qb = torch.randint(0, buckets, (b, h, rounds, n), generator=g)
    kb = None if shared else torch.randint(0, buckets, (b, h, rounds, n), generator=g)
    return q, k, v, qb, kb


def _keys(q, k, shared):
    return shared_keys(q) if shared else k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_qk", "separate_qk"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_op_matches_the_float64_reference_forward_and_backward(backend, shared, causal):
    """Odd length (19: the last chunk is short), chunks of 8 (3 chunks: the look-back wraps), padding on the
    last keys, 2 rounds; gradients of q, k, v against the reference's."""
    q, k, v, qb, kb = _case(shared)
    kpm = torch.ones(1, 19, dtype=torch.bool)
    kpm[0, 15:] = False
    scale = 1.0 if shared else None
    ref = lsh_attention_reference(q, _keys(q, k, shared), v, qb, kb, bucket_size=8, causal=causal,
                                  key_padding_mask=kpm, scale=scale)
    out = lsh_attention(q, _keys(q, k, shared), v, qb, kb, bucket_size=8, causal=causal, key_padding_mask=kpm,
                        scale=scale, backend=backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    leaves = (q, v) if shared else (q, k, v)
    got = torch.autograd.grad(out, leaves, go)
    want = torch.autograd.grad(ref, leaves, go.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_kv_heads_and_one_chunk(backend):
    """4 query heads on 2 KV heads (separate QK), and a sequence shorter than a chunk (one chunk: read once)."""
    q, k, v, qb, kb = _case(False, n=11, h=4, hk=2, buckets=2)
    kb = kb[:, ::2]  # the keys' buckets per KV head
    ref = lsh_attention_reference(q, k, v, qb, kb, bucket_size=16, causal=True)
    out = lsh_attention(q, k, v, qb, kb, bucket_size=16, causal=True, backend=backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_backends_agree_in_float64_on_a_longer_sequence():
    q, k, v, qb, kb = _case(False, n=70, rounds=3, buckets=6)
    ref = lsh_attention_reference(q, k, v, qb, kb, bucket_size=8, causal=True)
    out = lsh_attention(q.double(), k.double(), v.double(), qb, kb, bucket_size=8, causal=True, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_qk", "separate_qk"])
def test_decode_rows_equal_the_last_rows_of_the_whole_sequence(shared):
    q, k, v, qb, kb = _case(shared, n=23, rounds=3, buckets=4)
    kpm = torch.ones(1, 23, dtype=torch.bool)
    kpm[0, 3] = False
    keys = _keys(q, k, shared)
    scale = 1.0 if shared else None
    full = lsh_attention(q, keys, v, qb, kb, bucket_size=4, causal=True, key_padding_mask=kpm, scale=scale,
                         backend="torch")
    last = lsh_decode(q[:, :, -3:], keys, v, qb, kb, bucket_size=4, causal=True, key_padding_mask=kpm, scale=scale)
    torch.testing.assert_close(last, full[:, :, -3:], rtol=1e-5, atol=1e-6)


def test_a_shared_qk_token_reads_itself_only_when_nothing_else_is_there():
    """Causal, one bucket: token 0 has only itself (reads its own value); token 1 reads token 0 only."""
    q, k, v, qb, _ = _case(True, n=5, rounds=1, buckets=1)
    out = lsh_attention(q, shared_keys(q), v, qb, None, bucket_size=8, causal=True, scale=1.0, backend="torch")
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    torch.testing.assert_close(out[:, :, 1], v[:, :, 0])


def test_hashing_is_seeded_and_angular():
    x = torch.randn(2, 3, 50, 8)
    a = hash_vectors(x, 4, 6, seed=7)
    assert a.shape == (2, 3, 4, 50) and int(a.min()) >= 0 and int(a.max()) < 6
    assert torch.equal(a, hash_vectors(x, 4, 6, seed=7))
    assert not torch.equal(a, hash_vectors(x, 4, 6, seed=8))
    assert torch.equal(a, hash_vectors(3.5 * x, 4, 6, seed=7))  # a direction's hash: scale-free
    assert torch.equal(hash_vectors(x, 2, 1, seed=0), torch.zeros(2, 3, 2, 50, dtype=torch.long))
    assert torch.equal(hash_queries(x, 2, 6, 0), hash_queries(0.1 * x, 2, 6, 0))  # queries rescaled to M
    # causal keys: a key's bucket does not depend on later keys
    kb = hash_keys(x, 2, 6, 0, causal=True)
    assert torch.equal(kb[..., :20], hash_keys(x[:, :, :20], 2, 6, 0, causal=True))
    assert [num_buckets_for(n, 64) for n in (10, 64, 65, 200, 16384)] == [1, 1, 2, 4, 256]
    assert num_buckets_for(100, 64, num_buckets=8) == 8
    with pytest.raises(ValueError, match="even"):
        hash_vectors(x, 1, 5, 0)


def test_the_op_refuses_a_bad_call():
    q, k, v, qb, kb = _case(False)
    with pytest.raises(ValueError, match="backend='cuda'"):
        lsh_attention(q, k, v, qb, kb, bucket_size=8, backend="cuda")
    with pytest.raises(ValueError, match="bucket_size=0"):
        lsh_attention(q, k, v, qb, kb, bucket_size=0)
    with pytest.raises(ValueError, match="lsh_decode"):
        lsh_attention(q[:, :, :3], k, v, qb, kb, bucket_size=8)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (its interpreter on CPU)")
def test_the_fused_hash_kernel_gives_the_buckets_of_the_gemm_and_argmax():
    x = torch.randn(2, 2, 70, 16)
    e = torch.rand(2, 2, 70)
    for buckets in (4, 300):  # one column block, several (with a partial one)
        for extra in (None, e):  # the vectors [x, extra] (SMYRF's transforms) without building them
            want = hash_vectors(x, 3, buckets, seed=2, backend="torch", extra=extra)
            got = hash_vectors(x, 3, buckets, seed=2, backend="triton", extra=extra)
            assert (got == want).float().mean() > 0.995
    kx = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided: read in place
    want = hash_vectors(torch.cat([x, e[..., None]], -1), 3, 300, seed=2, backend="torch")
    assert (hash_vectors(kx, 3, 300, seed=2, backend="triton", extra=e) == want).float().mean() > 0.995


# ---------------------------------------------------------------------------- the fused path (Triton, interpreted)
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (its interpreter on CPU)")


def _projected(shared, b=2, n=23, h=2, hk=1, d=8, rounds=2, buckets=4, seed=3):
    """q, k, v as the modules make them: non-contiguous views of one projection (the kernels read them in place),
    grouped KV heads for separate QK."""
    g = torch.Generator().manual_seed(seed)
    hk = h if shared else hk
    w = torch.randn(b, n, (h + 2 * hk) * d, generator=g, requires_grad=True)
    q, k, v = w.split([h * d, hk * d, hk * d], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, d)).transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    qb = torch.randint(0, buckets, (b, h, rounds, n), generator=g)
    kb = None if shared else torch.randint(0, buckets, (b, hk, rounds, n), generator=g)
    return w, q, k, v, qb, kb


@needs_triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared_qk", "separate_qk"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fused_path_on_strided_grouped_padded_inputs(shared, causal):
    """Batch 2 with other padding per row (the first token padded in one: causal rows that read nothing), 2 query
    heads on 1 KV head, chunks of 6 (not a power of two: a masked tile), inputs that are strided views of one
    projection: forward and the gradient of the projection against float64."""
    w, q, k, v, qb, kb = _projected(shared)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[0, 19:] = False
    kpm[1, 0] = False
    kpm[1, 9] = False
    scale = 1.0 if shared else None
    keys = shared_keys(q) if shared else k
    out = lsh_attention(q, keys, v, qb, kb, bucket_size=6, causal=causal, key_padding_mask=kpm, scale=scale,
                        backend="triton")
    ref = lsh_attention_reference(q, keys, v, qb, kb, bucket_size=6, causal=causal, key_padding_mask=kpm,
                                  scale=scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, w, go, retain_graph=True)  # the keys' graph is shared with ref's
    (want,) = torch.autograd.grad(ref, w, go.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("shared", [False], ids=["separate_qk"])  # shared QK: the compile test below
def test_the_custom_ops_route_equals_the_autograd_function(shared):
    """``attnzoo::lsh_fwd``/``lsh_bwd`` (what torch.compile traces) give the Function's output, log-sum-exp and
    gradients; their fake implementations give the real shapes, dtypes and strides."""
    from attnzoo.ops.lsh.chunked import SEPARATE, SHARED
    from attnzoo.ops.lsh.op import _perm

    w, q, k, v, qb, kb = _projected(shared, b=1, n=19)
    keys = shared_keys(q) if shared else k
    qp = _perm(qb)
    kp = qp if shared else _perm(kb.repeat_interleave(2, dim=1))
    kpm = torch.ones(1, 19, dtype=torch.bool)
    kpm[0, 4] = False
    args = (q, keys, v, qp, kp, kpm)
    kw = dict(chunk=8, causal=True, self_mode=SHARED if shared else SEPARATE, scale=0.5, return_lse=True)
    results = []
    for compiled in (False, True):
        out, lse = triton_kernel.lsh_fused_attention(*args, compiled=compiled, **kw)
        results.append((out, lse, torch.autograd.grad(out, w, torch.ones_like(out), retain_graph=True)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t.detach()) for t in (q, keys, v, qp, kp)]
        fo, fs = torch.ops.attnzoo.lsh_fwd(*fake, mode.from_tensor(kpm.to(torch.int8)), 8, True, kw["self_mode"],
                                           0.5, 0.0)
    ro, rs = triton_kernel._fwd_op(*(t.detach() for t in (q, keys, v, qp, kp)), kpm.to(torch.int8), 8, True,
                                   kw["self_mode"], 0.5, 0.0)
    for f, r in ((fo, ro), (fs, rs)):
        assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride()


@needs_triton
def test_the_fused_log_sum_exp_is_the_combined_softmax_s():
    """One bucket, separate QK, 2 rounds: every round reads every other key, and the own key counts as 2 copies,
    so the combined log-sum-exp is ``logsumexp_j(s_ij) + log 2``."""
    from attnzoo.ops.lsh.chunked import SEPARATE
    from attnzoo.ops.lsh.op import _perm

    q, k, v, qb, kb = _case(False, n=13, rounds=2, buckets=1)
    qb, kb = torch.zeros_like(qb), torch.zeros_like(kb)
    out, lse = triton_kernel.lsh_fused_attention(q, k, v, _perm(qb), _perm(kb), None, chunk=16, causal=False,
                                                 self_mode=SEPARATE, scale=0.25, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) + math.log(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), rtol=1e-5, atol=1e-5)


@needs_triton
def test_the_fused_op_compiles_in_one_graph():
    """``torch.compile(fullgraph=True)`` (aot_eager: the fake implementations and the registered autograd) over
    the fused hash, the sort and the fused op (custom ops), forward and backward."""
    w, q, k, v, qb, kb = _projected(True, b=1, n=17, h=1)

    def f(q, v):
        qb = hash_vectors(q.detach(), 2, 4, seed=0, backend="triton")
        return lsh_attention(q, shared_keys(q), v, qb, None, bucket_size=8, causal=True, scale=1.0, backend="triton")

    want = f(q, v)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, v)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(t.sum(), w, retain_graph=True)[0] for t in (got, want)]
    torch.testing.assert_close(*grads)


@needs_triton
def test_the_fused_step_runs_no_gather_scatter_or_batched_matmul():
    """The design's promise, checked on the host's op list: a shared-QK forward+backward through the fused path
    (hash, sort, kernels) calls no gather, scatter, index or batched matmul (what the rows through the permutation
    and the elementwise combination replace)."""
    w, q, k, v, qb, kb = _projected(True, b=1, n=20, h=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qb = hash_vectors(q.detach(), 2, 4, seed=0, backend="triton")
        out = lsh_attention(q, shared_keys(q), v, qb, None, bucket_size=8, scale=1.0, backend="triton")
        out.sum().backward()
    names = {e.name for e in prof.events()}
    banned = {n for n in names if any(b in n for b in ("gather", "scatter", "index", "bmm", "einsum", "matmul"))}
    assert not banned, banned
    assert "aten::sort" in names


def test_float32_training_with_wide_buckets_is_dispatched_off_the_kernels():
    """The fused float32 backward fits shared memory up to bucket 64 (op.TRITON_FP32_GRAD_MAX_BUCKET): wider
    float32 training goes to the torch backend; 16-bit inputs and inference do not count."""
    from attnzoo.ops.lsh.op import TRITON_FP32_GRAD_MAX_BUCKET, _fp32_grad_too_wide

    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    assert TRITON_FP32_GRAD_MAX_BUCKET == 64
    assert _fp32_grad_too_wide(128, q) and not _fp32_grad_too_wide(64, q)
    assert not _fp32_grad_too_wide(128, q.detach())
    assert not _fp32_grad_too_wide(128, q.detach().bfloat16().requires_grad_())
    with torch.no_grad():
        assert not _fp32_grad_too_wide(128, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_train_under_autocast_as_sdpa_and_are_an_error_outside(backend):
    """A Hugging Face decoder under bf16 autocast hands q, k in float32 (RoPE promotes them) beside a bf16 v: the
    op casts all three to the autocast dtype (as SDPA), forward and backward equal the call on the cast inputs;
    outside autocast the mix is an error naming the dtypes. (The fused backward once read a float32 dO against a
    bf16 v and did not compile.)"""
    q, k, v, qb, kb = _case(False, n=21)
    vb = v.detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="dtypes differ"):
        lsh_attention(q, k, vb, qb, kb, bucket_size=8, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lsh_attention(q, k, vb, qb, kb, bucket_size=8, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().sum(), (q, k, vb))
    assert [g.dtype for g in got] == [torch.float32, torch.float32, torch.bfloat16]
    q2, k2 = (t.detach().bfloat16().requires_grad_() for t in (q, k))
    v2 = vb.detach().clone().requires_grad_()
    want_out = lsh_attention(q2, k2, v2, qb, kb, bucket_size=8, causal=True, backend=backend)
    want = torch.autograd.grad(want_out.float().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w.to(a.dtype), rtol=0, atol=0)
