"""attnzoo's Triton block-sparse kernel, run by Triton's interpreter on CPU (skipped without Triton).

The interpreter is selected before the kernel module is imported (``TRITON_INTERPRET=1``). On a GPU machine
the same tests run the compiled kernels (float32 dots in IEEE float32 unless torch allows TF32);
tests/test_sparse_gpu.py checks them in bf16/fp16 against float64.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.sparse.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU only: on a GPU the kernels compile (and must not be interpreted)
pytest.importorskip("triton")

from attnzoo.ops import sparse_attention  # noqa: E402
from attnzoo.ops.sparse import (BigBird, Fixed, Longformer, SlidingWindow, SparseKernelOptions, Strided,  # noqa: E402
                                 use_sparse_kernel_options)
from attnzoo.ops.sparse import triton_kernel  # noqa: E402

from oracle import bigbird_keep, fixed_keep, longformer_keep, naive_attention, sliding_keep, strided_keep  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernel.interpreted() and not torch.cuda.is_available(),
                                reason="the kernel module was imported without TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not triton_kernel.interpreted() else "cpu"
# float32 dots: NumPy's in the interpreter, IEEE float32 when compiled (TF32 only if torch allows it); compiled
# kernels also sum in another order, hence a little more room on a GPU
FWD_TOL = dict(rtol=1e-5, atol=1e-5) if DEV == "cpu" else dict(rtol=1e-4, atol=1e-4)
BWD_TOL = dict(rtol=1e-4, atol=1e-4) if DEV == "cpu" else dict(rtol=1e-3, atol=1e-3)

N = 101  # not a multiple of the 32-tiles (nor of the interpreter's 32-blocks)
CASES = [
    (SlidingWindow(window=20), lambda: sliding_keep(N, 20)),
    (SlidingWindow(window=20, causal=True), lambda: sliding_keep(N, 20, True)),
    (SlidingWindow(window=45), lambda: sliding_keep(N, 45)),  # wide enough for an unmasked middle stage
    (SlidingWindow(window=45, causal=True), lambda: sliding_keep(N, 45, True)),
    (Longformer(window=9, global_tokens=(0, 50, -1)), lambda: longformer_keep(N, 9, (0, 50, -1))),
    (Longformer(window=33, global_tokens=2, causal=True), lambda: longformer_keep(N, 33, 2, True)),
    (BigBird(block_size=16, window=16, random_blocks=1, causal=True), lambda: bigbird_keep(N, 16, 16, 2, 1, 0, True)),
    (Strided(stride=12, causal=True), lambda: strided_keep(N, 12, True)),
    (Fixed(stride=16, summary=3), lambda: fixed_keep(N, 16, 3)),
]


def _case_id(p) -> str:
    return f"{p.name}-{getattr(p, 'window', '')}" + ("-causal" if p.causal else "")


def _match_oracle(pattern, n, keep, padded):
    """The kernel (tile 32, grouped heads, key padding ``padded``: {batch row: slice}) against the float64 oracle,
    forward and backward."""
    q = torch.randn(2, 4, n, 16, device=DEV, requires_grad=True)
    k = torch.randn(2, 2, n, 16, device=DEV, requires_grad=True)
    v = torch.randn(2, 2, n, 16, device=DEV, requires_grad=True)
    kpm = torch.ones(2, n, dtype=torch.bool, device=DEV)
    for row, cols in padded.items():
        kpm[row, cols] = False
    out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, tile=32, backend="triton")
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), mask=keep, key_padding_mask=kpm.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, **FWD_TOL)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go.cpu().double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b.cpu().double(), **BWD_TOL)


@pytest.mark.parametrize("pattern, loops", CASES, ids=[_case_id(p) for p, _ in CASES])
def test_triton_kernel_matches_oracle(pattern, loops):
    _match_oracle(pattern, N, loops(), {1: slice(80, None), 0: slice(None, 5)})


def test_bigbird_with_tiles_inside_its_blocks_runs_without_mask_tables():
    """BigBird with tile == block_size: every visited tile is whole (causal aside), no bit masks."""
    n = 150
    pattern = BigBird(block_size=32, window=32, random_blocks=1)
    from attnzoo.ops.sparse import compile_layout

    assert triton_kernel.make_plan(compile_layout(pattern, n, 32)).bits is None
    q, k, v = (torch.randn(1, 2, n, 16, device=DEV, requires_grad=True) for _ in range(3))
    out = sparse_attention(q, k, v, pattern, tile=32, backend="triton")
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), mask=bigbird_keep(n, 32, 32, 2, 1, 0, False))
    torch.testing.assert_close(out.cpu().double(), ref, **FWD_TOL)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.cpu().double())):
        torch.testing.assert_close(a.cpu().double(), b.cpu().double(), **BWD_TOL)


def test_plans_band_list_and_bit_packed_masks():
    from attnzoo.ops.sparse import compile_layout

    p = triton_kernel.make_plan(compile_layout(SlidingWindow(window=20, causal=True), N, 32))
    assert (p.mode, p.lo, p.hi, p.n_global) == (triton_kernel.Mode.BAND, -20, 0, 0)
    p = triton_kernel.make_plan(compile_layout(Longformer(window=9, global_tokens=(0, 50, -1)), N, 32))
    assert (p.mode, p.lo, p.hi, p.gpos.tolist()) == (triton_kernel.Mode.BAND, -9, 9, [0, 50, N - 1])
    layout = compile_layout(Strided(stride=12), N, 32)
    p = triton_kernel.make_plan(layout)
    assert p.mode == triton_kernel.Mode.LIST and p.bits.shape == (int(layout.partial_count.sum()), 32, 1)
    # query tile 0 visits its partial tiles in ascending order; check one tile's bits against the pattern
    kt = int(layout.partial_index[0, 1])
    words = p.bits[int(p.ids[0, 1]), :, 0].to(torch.int64) % 2 ** 32
    got = torch.stack([(words >> c) & 1 for c in range(32)], 1).bool()
    i, j = torch.arange(32)[:, None], kt * 32 + torch.arange(32)[None, :]
    assert torch.equal(got, (((i - j).abs() < 12) | ((i - j) % 12 == 0)) & (j < N))
    fct, fit = p.full_t
    assert int(fct.sum()) == int(layout.full_count.sum())  # every full tile listed once per KV tile


def test_unavailable_reasons():
    q = torch.randn(1, 2, 40, 12, device=DEV)
    with pytest.raises(Exception, match="head_dim"):
        sparse_attention(q, q, q, SlidingWindow(window=3), tile=32, backend="triton")
    q = torch.randn(1, 2, 40, 16, device=DEV)
    with pytest.raises(Exception, match="multiple of 32"):
        sparse_attention(q, q, q, Strided(stride=3), tile=16, backend="triton")
    sparse_attention(q, q, q, SlidingWindow(window=3), tile=16, backend="triton")  # a band needs no mask table


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_bigbird_global_rows_in_the_kernel_and_split_kv_tiles(causal):
    """Tiles = blocks: the kernels compute the global rows themselves (no dense pass), and KV tiles with long
    lists (the global blocks every query reads) are split over several dK/dV programs (split_min lowered so a
    short sequence splits too: lists of 5 in parts of 2 and 3), with padding, grouped heads and a length that is
    no multiple of the tile."""
    from attnzoo.ops.sparse import compile_layout

    n = 150
    pattern = BigBird(block_size=32, window=32, random_blocks=1, causal=causal)
    layout = compile_layout(pattern, n, 32, "cpu")
    assert triton_kernel.rows_in_kernel(layout)
    assert triton_kernel.make_plan(layout, rows=True).n_split == 0  # the default thresholds: nothing to split here
    with use_sparse_kernel_options(split_min=2, split_factor=0):
        p = triton_kernel.make_plan(layout, rows=True)
        assert p.rows and p.n_split > 0 and (p.items[:, 3] >= 0).any()
        assert not triton_kernel.make_plan(layout).rows  # global_rows=False keeps them out of the kernel
        _match_oracle(pattern, n, bigbird_keep(n, 32, 32, 2, 1, 0, causal), {1: slice(120, None)})


def test_global_rows_stay_out_of_the_kernel_unless_they_fill_whole_exact_tiles():
    from attnzoo.ops.sparse import compile_layout

    assert not triton_kernel.rows_in_kernel(compile_layout(BigBird(block_size=16, window=16), 150, 32))  # masks
    assert not triton_kernel.rows_in_kernel(compile_layout(Longformer(window=9, global_tokens=2), 150, 32))  # band
    assert not triton_kernel.rows_in_kernel(compile_layout(SlidingWindow(window=9), 150, 32))  # none


BAND_CASES = [(SlidingWindow(window=20), lambda n: sliding_keep(n, 20)),
              (SlidingWindow(window=45, causal=True), lambda n: sliding_keep(n, 45, True)),
              (Longformer(window=9, global_tokens=(0, 50, -1)), lambda n: longformer_keep(n, 9, (0, 50, -1)))]


def _match_unpadded(pattern, keep, q, k, v):
    out = sparse_attention(q, k, v, pattern, tile=32, backend="triton")
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), mask=keep)
    torch.testing.assert_close(out.cpu().double(), ref, **FWD_TOL)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.cpu().double())):
        torch.testing.assert_close(a.cpu().double(), b.cpu().double(), **BWD_TOL)
    return out


@pytest.fixture
def fixed_everywhere():
    """The fixed softmax reference for any band size (the library keeps it to wide bands and long inputs)."""
    with use_sparse_kernel_options(fixed_min_width=0, fixed_min_rows=0) as options:
        yield options


@pytest.mark.parametrize("pattern, keep", BAND_CASES, ids=[_case_id(p) for p, _ in BAND_CASES])
def test_band_fixed_reference_matches_oracle(fixed_everywhere, pattern, keep):
    """Without padding a band forward takes each row's self-score as its softmax reference (stage 1) instead of
    a running max; forward and backward against float64, grouped heads, a length no multiple of the blocks."""
    from attnzoo.ops.sparse import compile_layout

    p = triton_kernel.make_plan(compile_layout(pattern, N, 32, DEV))
    assert triton_kernel.autograd._fixed_reference(p, False, torch.float32, 2 * 4 * N, fixed_everywhere)
    q = torch.randn(2, 4, N, 16, device=DEV, requires_grad=True)
    k, v = (torch.randn(2, 2, N, 16, device=DEV, requires_grad=True) for _ in range(2))
    _match_unpadded(pattern, keep(N), q, k, v)


def test_fixed_reference_only_where_every_row_keeps_its_own_key_and_it_pays():
    from attnzoo.ops.sparse import compile_layout

    rows, opts = 12 * 16384, SparseKernelOptions()

    def fixed(p, padding, dtype, rows, options=opts):
        return triton_kernel.autograd._fixed_reference(p, padding, dtype, rows, options)

    band = triton_kernel.make_plan(compile_layout(SlidingWindow(window=256), 16384, 64, DEV))
    assert fixed(band, False, torch.bfloat16, rows)
    assert fixed(band, False, torch.float32, rows)
    assert not fixed(band, False, torch.bfloat16, rows, SparseKernelOptions(fixed_reference=False))  # switched off
    assert not fixed(band, True, torch.bfloat16, rows)  # padding may drop a row's own key
    assert not fixed(band, False, torch.float16, rows)  # p would overflow float16's 2**16
    assert not fixed(band, False, torch.bfloat16, 12 * 4096)  # too short to pay
    causal = triton_kernel.make_plan(compile_layout(SlidingWindow(window=256, causal=True), 16384, 64, DEV))
    assert not fixed(causal, False, torch.bfloat16, rows)  # too narrow to pay
    wide_causal = triton_kernel.make_plan(compile_layout(SlidingWindow(window=512, causal=True), 16384, 64, DEV))
    assert fixed(wide_causal, False, torch.bfloat16, rows)
    listed = triton_kernel.make_plan(compile_layout(Strided(stride=12), N, 32, DEV))
    assert not fixed(listed, False, torch.float32, 1 << 30)  # list mode: running max


def _overflowing_inputs(n, rows):
    """q, k, v where each row in ``rows`` (batch, head, position) keeps a key whose score is ~1150 log2-units
    above its own (exp2 overflows float32 at 128): the fixed reference must be redone there."""
    q = torch.randn(2, 4, n, 16)
    k, v = torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
    for b, h, i in rows:
        j = i + 3 if i + 3 < n else i - 3  # inside every band case's window
        q[b, h, i] = 0.0
        q[b, h, i, 0] = 40.0
        k[b, h // 2, j] = 0.0
        k[b, h // 2, j, 0] = 40.0  # score 40 * 40 / sqrt(16) = 400
        k[b, h // 2, i] = -k[b, h // 2, j]  # own score -400
    return tuple(t.to(DEV).requires_grad_() for t in (q, k, v))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, in the interpreter, on the overflow itself
@pytest.mark.parametrize("pattern, keep", BAND_CASES[:2], ids=[_case_id(p) for p, _ in BAND_CASES[:2]])
def test_fixed_reference_overflow_is_redone(monkeypatch, fixed_everywhere, pattern, keep):
    """Blocks in several batches, heads and positions (the last, partial block too) overflow under the fixed
    reference; stage 2 redoes exactly those with the running max. Without the redo their output is not finite,
    which shows this test reaches it."""
    rows = [(0, 0, 5), (0, 3, 40), (1, 1, 70), (1, 2, N - 1)]
    q, k, v = _overflowing_inputs(N, rows)
    _match_unpadded(pattern, keep(N), q, k, v)
    monkeypatch.setattr(triton_kernel.autograd, "_redo_overflowed", lambda *a: None)
    out = sparse_attention(q, k, v, pattern, tile=32, backend="triton")
    bad = ~torch.isfinite(out).all(-1)
    assert all(bad[b, h, i] for b, h, i in rows)
    assert int(bad.sum()) <= len(rows)  # only the overflowing rows


def _custom_op_case(pattern, strided=False):
    """The layout, whether global rows are in the kernel, q [2, 4 heads] and k, v [2, 2 heads] (grouped), and a
    key-padding mask with padding on the second row. ``strided``: q, k, v are views of one ``[2, N, 8, 16]``
    projection output, as a module makes them (not contiguous; the custom ops' outputs are)."""
    from attnzoo.ops.sparse import compile_layout

    layout = compile_layout(pattern, N, 32, DEV)
    rows = triton_kernel.rows_in_kernel(layout)
    if strided:
        x = torch.randn(2, N, 8, 16, device=DEV).transpose(1, 2)
        q, k, v = (t.detach().requires_grad_() for t in (x[:, :4], x[:, 4:6], x[:, 6:]))
        assert not q.is_contiguous()
    else:
        q = torch.randn(2, 4, N, 16, device=DEV, requires_grad=True)
        k, v = (torch.randn(2, 2, N, 16, device=DEV, requires_grad=True) for _ in range(2))
    kpm = torch.ones(2, N, dtype=torch.bool, device=DEV)
    kpm[1, 80:] = False
    return layout, rows, q, k, v, kpm


@pytest.mark.parametrize("pattern, loops", [CASES[0], CASES[4], CASES[6], CASES[7]],
                         ids=["sliding", "longformer", "bigbird-causal", "strided-causal"])
def test_the_custom_ops_launch_what_the_autograd_function_launches(pattern, loops):
    """The route ``torch.compile`` traces (the ``attnzoo::block_sparse_fwd``/``_bwd`` custom ops, autograd through
    ``torch.library.register_autograd``), called eagerly: the same kernels on the same plan give the same bits as the
    autograd function, forward and backward, with padding, grouped heads and global rows."""
    from attnzoo.ops.sparse.triton_kernel import block_sparse_attention

    layout, rows, q, k, v, kpm = _custom_op_case(pattern)
    go = torch.randn(2, 4, N, 16, device=DEV)
    outs = []
    for compiled in (False, True):
        out = block_sparse_attention(q, k, v, layout, kpm, None, rows, compiled=compiled)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pattern, loops, backend, strided",
                         [(*CASES[0], "inductor", True), (*CASES[5], "aot_eager", False)],
                         ids=["sliding-inductor-strided", "longformer-causal-aot_eager"])
def test_under_torch_compile_the_custom_ops_match_float64(pattern, loops, backend, strided):
    """``torch.compile`` of a function calling the op takes the custom ops (fake implementations for tracing, the
    kernels run as they are): forward and backward against float64, with padding and grouped heads; with q, k, v
    views of one projection (Inductor checks the real outputs' strides against the fake ones)."""
    from attnzoo.ops.sparse.triton_kernel import block_sparse_attention

    torch._dynamo.reset()
    layout, rows, q, k, v, kpm = _custom_op_case(pattern, strided)

    @torch.compile(backend=backend)  # the options ContextVar breaks the graph before the op: not fullgraph
    def f(q, k, v):
        return block_sparse_attention(q, k, v, layout, kpm, None, rows, compiled=True) * 2

    out = f(q, k, v)
    keep = loops()[None, None] & kpm[:, None, None, :].cpu()
    want = 2 * naive_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), mask=keep)
    torch.testing.assert_close(out.detach().cpu().double(), want, **FWD_TOL)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = 2 * naive_attention(q64, k64, v64, mask=keep)
    for a, b in zip(got, torch.autograd.grad(ref, (q64, k64, v64), go.cpu().double())):
        torch.testing.assert_close(a.cpu().double(), b, **BWD_TOL)


def test_a_remembered_triton_choice_turns_down_inputs_it_cannot_read(monkeypatch):
    """Dispatch remembers its choice per call signature, which does not hold strides: a later call whose q has a
    strided last dimension is turned down at run time by the Triton backend and served by the next backend."""
    from attnzoo.ops import last_sparse_decision
    from attnzoo.ops.sparse import op

    monkeypatch.setitem(op.SPARSE_ORDER, DEV, ("triton", "gather", "masked"))
    monkeypatch.setattr(op._SPARSE, "chosen", {})
    pattern = SlidingWindow(window=20)
    q, k, v = (torch.randn(1, 2, N, 16, device=DEV) for _ in range(3))
    sparse_attention(q, k, v, pattern, tile=32)
    assert last_sparse_decision().backend == "triton"
    q2 = torch.randn(1, 2, N, 32, device=DEV)[..., ::2]
    out = sparse_attention(q2, k, v, pattern, tile=32)
    d = last_sparse_decision()
    assert d.backend == "gather" and "contiguous last dimension" in d.rejected["triton"], str(d)
    ref = naive_attention(q2.cpu(), k.cpu(), v.cpu(), mask=sliding_keep(N, 20))
    torch.testing.assert_close(out.cpu().double(), ref, **FWD_TOL)


def test_a_strided_key_padding_mask_is_read_as_its_values():
    """The kernels read the key-padding mask as a contiguous [B, N] table: a strided view of a larger mask gives the
    result of its values."""
    pattern = SlidingWindow(window=20)
    q, k, v = (torch.randn(2, 2, N, 16, device=DEV) for _ in range(3))
    wide = torch.rand(2, 2 * N, device=DEV) > 0.3
    kpm = wide[:, ::2]
    assert not kpm.is_contiguous()
    out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, tile=32, backend="triton")
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), mask=sliding_keep(N, 20), key_padding_mask=kpm.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, **FWD_TOL)
