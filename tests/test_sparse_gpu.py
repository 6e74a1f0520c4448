"""GPU: every kernel path of the sparse op in bf16/fp16 against the float64 reference, forward and backward:
FlexAttention over the layout, the Triton kernels (band and list modes, fixed softmax reference and its redo, split
dK/dV tiles, global rows in the kernel, per-call layouts) eagerly, through their custom ops and under
``torch.compile``, FlashAttention-4's local attention where flash-attn-4 is installed, the gather twin; CUDA-graph
capture and no host syncs once warm; the sparse modules on CUDA; what dispatch picks.

Run on a GPU machine: ``python -m pytest -m gpu -q -rs tests/test_sparse_gpu.py``. Skipped without CUDA.
FlexAttention compiles once per (pattern, length, masks) shape and the Triton kernel autotunes per shape,
so the matrix is kept lean.
"""
import pytest
import torch

import attnzoo
from attnzoo.ops import explain_sparse, sparse_attention
from attnzoo.ops.sparse import BigBird, Fixed, Longformer, SlidingWindow, Strided, use_sparse_kernel_options

pytestmark = pytest.mark.gpu

TOL = 1e-2  # ‖out − ref‖ / ‖ref‖

PATTERNS = {
    "sliding": lambda c: SlidingWindow(window=100, causal=c),
    "longformer": lambda c: Longformer(window=64, global_tokens=(0, 5, 300, 998), causal=c),
    "bigbird": lambda c: BigBird(block_size=64, window=64, global_blocks=2, random_blocks=3, causal=c),
    "strided": lambda c: Strided(stride=48, causal=c),
    "fixed": lambda c: Fixed(stride=64, summary=8, causal=c),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(dtype, b=2, hq=8, hkv=4, n=999, d=64):
    dev = "cuda"
    q = torch.randn(b, hq, n, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
    return q, k, v


def _padding(kind, b, n):
    if kind == "none":
        return None
    kpm = torch.ones(b, n, dtype=torch.bool, device="cuda")
    kpm[0, n - 137:] = False
    kpm[-1, :41] = False
    return kpm


def _against_float64(q, k, v, pattern, backend, kpm=None, tile=None):
    """``backend`` on q, k, v (leaves that require grad) against the float64 reference: output and dQ, dK, dV
    for one random dO, relative error below TOL, every gradient finite."""
    out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, backend=backend, tile=tile)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_attention(q64, k64, v64, pattern, key_padding_mask=kpm, backend="reference")
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert _rel(out, ref) < TOL, f"forward rel err {_rel(out, ref):.2e}"
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), go.to(q.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), go)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert _rel(a, b) < TOL, f"d{name} rel err {_rel(a, b):.2e}"


def _check(backend, pattern, dtype, padding, n=999):
    q, k, v = _inputs(dtype, n=n)
    tile = 128 if backend == "flex" else None  # flex on CUDA serves 128-tiles only
    _against_float64(q, k, v, pattern, backend, kpm=_padding(padding, 2, n), tile=tile)


def _fused_cases():
    for backend in ("flex", "triton"):
        for name in PATTERNS:  # every pattern causal and not, with and without padding (flex compiles per case)
            for causal, padding in ((False, "padding"), (True, "none")):
                yield pytest.param(backend, name, causal, padding, torch.bfloat16,
                                   id=f"{backend}-{name}-{'causal' if causal else 'full'}-{padding}-bf16")
        for name in ("sliding", "bigbird"):
            yield pytest.param(backend, name, True, "padding", torch.float16,
                               id=f"{backend}-{name}-causal-padding-fp16")


@pytest.mark.parametrize("backend, name, causal, padding, dtype", list(_fused_cases()))
def test_fused_matches_float64(backend, name, causal, padding, dtype):
    _check(backend, PATTERNS[name](causal), dtype, padding)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_gather_matches_float64(name, causal):
    _check("gather", PATTERNS[name](causal), torch.bfloat16, "padding")


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_fused_at_other_odd_lengths(backend):
    for n in (129, 1500) if backend == "flex" else (77, 129, 1500):
        _check(backend, SlidingWindow(window=256, causal=True), torch.bfloat16, "none", n=n)


def test_flex_declines_a_sequence_shorter_than_one_tile_and_dispatch_goes_on():
    """Compiled FlexAttention has no kernel configuration for n < tile: forced, it says so; dispatched, the next
    backend serves the call."""
    q, k, v = _inputs(torch.bfloat16, n=77)
    with pytest.raises(attnzoo.errors.BackendUnavailableError, match="shorter than one tile"):
        sparse_attention(q, k, v, SlidingWindow(window=256, causal=True), backend="flex")
    out = sparse_attention(q, k, v, SlidingWindow(window=256, causal=True))
    assert out.shape == q.shape


@pytest.fixture
def fixed_everywhere():
    """The forward's fixed softmax reference for any band (the library keeps it to wide bands, long inputs)."""
    with use_sparse_kernel_options(fixed_min_width=0, fixed_min_rows=0) as options:
        yield options


@pytest.mark.parametrize("name", ["sliding", "longformer"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_band_fixed_reference_matches_float64(fixed_everywhere, name, causal):
    _check("triton", PATTERNS[name](causal), torch.bfloat16, "none")


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_band_fixed_reference_overflow_is_redone(monkeypatch, fixed_everywhere, causal):
    """bf16 band without padding: the forward's fixed softmax reference (each row's self-score). Rows whose kept
    score lies ~580 log2-units above their own overflow it; stage 2 redoes those blocks with the running max.
    Against float64, forward and backward; without the redo exactly those rows come out non-finite."""
    from attnzoo.ops.sparse import triton_kernel as tk

    n, rows = 1500, [(0, 0, 3), (0, 7, 700), (1, 2, 1023), (1, 5, 1499)]
    q, k, v = (t.detach() for t in _inputs(torch.bfloat16, n=n))
    for b, h, i in rows:
        j = i - 3  # kept in both bands
        q[b, h, i] = 0.0
        q[b, h, i, 0] = 40.0
        k[b, h // 2, j] = 0.0
        k[b, h // 2, j, 0] = 40.0  # score 40 * 40 / 8 = 200
        k[b, h // 2, i] = -k[b, h // 2, j]  # own score -200
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pattern = SlidingWindow(window=256, causal=causal)
    _against_float64(q, k, v, pattern, "triton")
    monkeypatch.setattr(tk.autograd, "_redo_overflowed", lambda *a: None)
    bad = ~torch.isfinite(sparse_attention(q, k, v, pattern, backend="triton")).all(-1)
    assert all(bad[b, h, i] for b, h, i in rows) and int(bad.sum()) == len(rows)


@pytest.mark.parametrize("fixed", [False, True], ids=["running-max", "fixed-reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_band_on_strided_views_of_one_projection(fixed, causal):
    """The band kernels on strided views of one projection at an odd length, against float64, forward and
    backward, with the running max and with the fixed reference (and its redo launch)."""
    opts = dict(fixed_min_width=0, fixed_min_rows=0) if fixed else dict(fixed_reference=False)
    torch.manual_seed(3)
    x = torch.randn(2, 1999, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in x.permute(2, 0, 3, 1, 4).unbind(0))
    with use_sparse_kernel_options(**opts):
        _against_float64(q, k, v, SlidingWindow(window=200, causal=causal), "triton")


def test_triton_on_strided_qkv_from_one_projection():
    """q, k, v as the benchmark makes them: views of one [B, N, 3, H, D] projection, no copies."""
    lin = torch.nn.Linear(768, 3 * 768, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2000, 768, device="cuda", dtype=torch.bfloat16)
    q, k, v = lin(x).view(1, 2000, 3, 12, 64).permute(2, 0, 3, 1, 4)
    p = SlidingWindow(window=256)
    out = sparse_attention(q, k, v, p, backend="triton")
    ref = sparse_attention(q.double(), k.double(), v.double(), p, backend="reference")
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_bigbird_long_enough_to_split_its_global_kv_tiles(causal):
    """N=4131 (65 blocks of 64, the last short): the global blocks' KV tiles are read by every query tile, so
    their dK/dV is split over several programs (float32 parts, the last program writes the tile); the global
    rows are computed in the kernel. Against float64, forward and backward, with padding and grouped heads."""
    from attnzoo.ops.sparse import compile_layout
    from attnzoo.ops.sparse import triton_kernel as tk

    n = 4131
    pattern = BigBird(block_size=64, window=64, global_blocks=2, random_blocks=3, causal=causal)
    p = tk.make_plan(compile_layout(pattern, n, 64, "cuda"), rows=True)
    assert p.rows and p.n_split >= 1, p.items[:4]
    q, k, v = _inputs(torch.bfloat16, b=1, hq=4, hkv=2, n=n)
    kpm = torch.ones(1, n, dtype=torch.bool, device="cuda")
    kpm[0, n - 300:] = False
    out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, backend="triton")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_attention(q64, k64, v64, pattern, key_padding_mask=kpm, backend="reference")
    assert _rel(out, ref) < TOL, f"forward rel err {_rel(out, ref):.2e}"
    go = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), go.to(out.dtype)),
                          torch.autograd.grad(ref, (q64, k64, v64), go)):
        assert _rel(a, b) < TOL, f"d{name} rel err {_rel(a, b):.2e}"


def test_dispatch_picks_the_first_of_the_cuda_order():
    from attnzoo.ops.sparse.op import SPARSE_ORDER

    q, k, v = _inputs(torch.bfloat16, n=1024)
    d = explain_sparse(q, k, v, SlidingWindow(window=256))
    assert d.backend == SPARSE_ORDER["cuda:band"][0] == "triton", str(d)
    bb = BigBird(block_size=64, window=64, global_blocks=2, random_blocks=3)
    assert explain_sparse(q, k, v, bb).backend == "triton"  # flex serves 128-tiles only, BigBird's tile is 64
    assert explain_sparse(q, k, v, bb, tile=128).backend == SPARSE_ORDER["cuda"][0] == "flex"
    d = explain_sparse(q[:, :, -1:], k, v, SlidingWindow(window=256, causal=True))
    assert d.backend == "masked", str(d)


@pytest.mark.parametrize("name, opts", [
    ("sliding_window", dict(window=128, causal=True)),
    ("longformer", dict(window=64, global_tokens=(0, 700), global_projections=True)),
    ("bigbird", dict(block_size=64, random_blocks=2)),
])
def test_modules_on_cuda_match_float64(name, opts):
    torch.manual_seed(0)
    m64 = attnzoo.create(name, dim=512, heads=8, **opts).double().cuda()
    m = attnzoo.create(name, dim=512, heads=8, **opts).to("cuda", torch.bfloat16)
    m.load_state_dict(m64.state_dict())
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.float64)
    xb = x.to(torch.bfloat16).requires_grad_()
    x64 = xb.detach().double().requires_grad_()
    y, ref = m(xb), m64(x64)
    assert _rel(y, ref) < TOL
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, xb, g.to(torch.bfloat16))
    (rx,) = torch.autograd.grad(ref, x64, g)
    assert _rel(gx, rx) < TOL


def test_rolling_cache_decoding_on_cuda():
    m = attnzoo.create("sliding_window", dim=256, heads=4, window=64, causal=True, rope=True).cuda().eval()
    x = torch.randn(1, 300, 256, device="cuda")
    with torch.no_grad():
        full = m(x)
        cache = m.make_cache()
        outs = [m(x[:, :100], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(100, 300)]
    assert _rel(torch.cat(outs, 1), full) < 1e-4
    assert cache.nbytes() == 2 * 2 * 64 * 256 * 4  # k and v, 2 * window slots, float32


# ---------------------------------------------------------------------------- the compiled route (custom ops)
COMPILED_CASES = {
    "sliding": lambda: SlidingWindow(window=100),
    "sliding-causal": lambda: SlidingWindow(window=100, causal=True),
    "longformer": lambda: Longformer(window=64, global_tokens=(0, 5, 300, 998)),  # global columns' dK/dV in the op
    "bigbird": lambda: BigBird(block_size=64, window=64, global_blocks=2, random_blocks=3),  # rows in the kernel
    "strided": lambda: Strided(stride=48, causal=True),  # bit masks
}


@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_custom_ops_give_the_autograd_functions_bits(name):
    """``attnzoo::block_sparse_fwd``/``_bwd`` called eagerly launch the same kernels with the same configurations
    as the autograd function: the same bits, forward and backward."""
    from attnzoo.ops.sparse import compile_layout
    from attnzoo.ops.sparse.triton_kernel import block_sparse_attention, rows_in_kernel

    pattern = COMPILED_CASES[name]()
    q, k, v = _inputs(torch.bfloat16)
    layout = compile_layout(pattern, q.shape[2], pattern.default_tile(), "cuda")
    kpm = _padding("padding", 2, q.shape[2])
    go = torch.randn_like(q)
    results = []
    for compiled in (False, True):
        out = block_sparse_attention(q, k, v, layout, kpm, None, rows_in_kernel(layout), compiled=compiled)
        results.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_torch_compile_matches_float64(name):
    """Under ``torch.compile`` the op's Triton kernels are the custom ops (opaque to Inductor): forward and
    backward against float64, with padding and grouped heads."""
    torch._dynamo.reset()
    pattern = COMPILED_CASES[name]()
    q, k, v = _inputs(torch.bfloat16)
    kpm = _padding("padding", 2, q.shape[2])

    @torch.compile
    def f(q, k, v):
        return sparse_attention(q, k, v, pattern, key_padding_mask=kpm, backend="triton")

    out = f(q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_attention(q64, k64, v64, pattern, key_padding_mask=kpm, backend="reference")
    assert _rel(out, ref) < TOL, f"forward rel err {_rel(out, ref):.2e}"
    go = torch.randn_like(ref)
    for nm, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), go.to(q.dtype)),
                        torch.autograd.grad(ref, (q64, k64, v64), go)):
        assert _rel(a, b) < TOL, f"d{nm} rel err {_rel(a, b):.2e}"


def test_custom_op_opcheck():
    """torch.library.opcheck on the forward op (schema, fake tensors, autograd registration, static AOT dispatch;
    dynamic-shape AOT dispatch is not claimed: the plan's integers are not symbolic)."""
    from attnzoo.ops.sparse import compile_layout
    from attnzoo.ops.sparse.triton_kernel import make_plan

    n = 999
    layout = compile_layout(SlidingWindow(window=100), n, 128, "cuda")
    p = make_plan(layout)
    q, k, v = _inputs(torch.bfloat16, n=n)
    args = (q, k, v, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None,
            p.mode, p.causal, p.lo, p.hi, layout.tile, layout.num_tiles, 0, 0.125, False)
    torch.library.opcheck(torch.ops.attnzoo.block_sparse_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))


# ---------------------------------------------------------------------------- host behaviour of the eager route
def test_eager_route_has_no_host_syncs_once_warm_and_replays_from_a_cuda_graph():
    """After the first call of a signature (plan, tuning), a forward and backward of the default route neither
    syncs with the GPU nor allocates on the host side in a way a CUDA graph cannot capture: captured and replayed,
    it gives the eager result."""
    x = torch.randn(1, 2048, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.detach().requires_grad_() for t in x.permute(2, 0, 3, 1, 4).unbind(0))
    pattern = SlidingWindow(window=256)
    go = torch.randn(1, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = sparse_attention(q, k, v, pattern)
        return (out, *torch.autograd.grad(out, (q, k, v), go))

    want = step()  # first call: layout, plan, tuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Fresh leaves for the capture: autograd nodes remember the stream they were made on, and q, k, v's were made
    # on the default stream by the eager calls above, which a capture may not wait on (PyTorch's rule for
    # capturing backward: warm up on a side stream). The library's kernels are the same; only the leaves change.
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up on the side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = step()
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- per-call layouts, FlashAttention-4
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_per_call_layout_matches_float64(causal):
    """A layout built from this call's inputs (LSH-style buckets of 64-token blocks plus a local window) through
    the Triton kernels (list mode, bit masks), forward and backward against float64."""
    from attnzoo.ops.sparse import BlockLayout

    n = 999
    bucket = torch.randint(0, 4, (n,), device="cuda")
    layout = BlockLayout.from_rule(lambda i, j: (bucket[i] == bucket[j]) | ((i - j).abs() <= 32), n, 64,
                                   causal=causal, device="cuda")
    q, k, v = _inputs(torch.bfloat16, n=n)
    _against_float64(q, k, v, layout, "triton", kpm=_padding("padding", 2, n))


def _fa4_installed() -> bool:
    from attnzoo.ops.sparse.flash_attn_cute import band_reason  # noqa: F401

    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or not importable here
        return False
    return True


@pytest.mark.parametrize("name, causal, n, dtype", [
    ("sliding", False, 999, torch.bfloat16), ("sliding", True, 1500, torch.bfloat16),
    ("sliding", False, 1024, torch.float16)])
def test_flash_attn_cute_band_matches_float64(name, causal, n, dtype):
    if not _fa4_installed():
        pytest.skip("flash-attn-4 (flash_attn.cute) is not installed")
    q, k, v = _inputs(dtype, n=n, hkv=8)
    _against_float64(q, k, v, PATTERNS[name](causal), "flash_attn_cute")
