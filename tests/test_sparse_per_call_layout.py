"""Per-call block layouts (BlockLayout.from_rule): a layout computed from one call's inputs, taken by every backend
as a cached positional layout is. On CPU: gather, masked, reference, and the Triton kernels under Triton's
interpreter when Triton is installed."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "attnzoo.ops.sparse.triton_kernel" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU only (see tests/test_sparse_triton.py)

from attnzoo.ops import last_sparse_decision, sparse_attention  # noqa: E402
from attnzoo.ops.sparse import BlockLayout, Rule, SlidingWindow, Strided, compile_layout  # noqa: E402
from attnzoo.ops.sparse import op as sparse_op  # noqa: E402

from oracle import naive_attention, sliding_keep, strided_keep  # noqa: E402

N = 101


def _triton_here() -> bool:
    try:
        from attnzoo.ops.sparse import triton_kernel
    except ImportError:
        return False
    return triton_kernel.available("cpu") is None


BACKENDS = ["gather", "masked", "reference"] + (["triton"] if _triton_here() else [])


def _strided_rule(i, j):
    return ((i - j).abs() < 12) | ((i - j) % 12 == 0)


def _qkv(requires_grad=True):
    q = torch.randn(2, 4, N, 16, requires_grad=requires_grad)
    k, v = (torch.randn(2, 2, N, 16, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def test_a_rule_compiles_to_the_layout_of_the_same_positional_pattern():
    fixed = compile_layout(Strided(stride=12, causal=True), N, 32)
    per_call = BlockLayout.from_rule(_strided_rule, N, 32, causal=True)
    assert per_call.per_call and not fixed.per_call
    for name in ("partial_count", "partial_index", "full_count", "full_index"):
        assert torch.equal(getattr(per_call, name), getattr(fixed, name)), name
    assert (per_call.kept, per_call.kept_total) == (fixed.kept, fixed.kept_total)
    assert BlockLayout.from_rule(_strided_rule, N, 32, causal=True) is not per_call  # never cached


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_per_call_layout_equal_to_a_positional_one_gives_identical_results(backend):
    """Same rule, same tiles: the per-call layout runs the very computation of the cached one (same plan, same
    kernels), forward and backward, bit for bit, with padding and grouped heads."""
    q, k, v = _qkv()
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1, 90:] = False
    go = torch.randn(2, 4, N, 16)
    results = []
    for pattern in (Strided(stride=12, causal=True), BlockLayout.from_rule(_strided_rule, N, 32, causal=True)):
        out = sparse_attention(q, k, v, pattern, key_padding_mask=kpm, tile=None if isinstance(pattern, BlockLayout)
                               else 32, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = naive_attention(q, k, v, mask=strided_keep(N, 12, True), key_padding_mask=kpm)
    torch.testing.assert_close(results[0][0].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_content_dependent_rule_matches_the_oracle(backend):
    """LSH-style buckets drawn for this call (each query attends to the keys of its bucket), bidirectional, as a
    Rule passed straight to the op: against the float64 oracle with the dense keep mask of the same buckets."""
    bucket = torch.randint(0, 4, (N,))
    q, k, v = _qkv()
    rule = Rule(keep=lambda i, j: bucket[i] == bucket[j], label="lsh")
    out = sparse_attention(q, k, v, rule, tile=32, backend=backend)
    keep = bucket[:, None] == bucket[None, :]
    ref = naive_attention(q, k, v, mask=keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go.double())):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _triton_here(), reason="needs Triton (its interpreter on CPU)")
def test_a_band_as_a_rule_walks_the_tile_lists_and_agrees_with_the_band_kernels():
    """A sliding window given as a per-call rule runs the list kernels with bit masks (a rule has no band), the
    positional one the band kernels: other summation orders, the same attention."""
    q, k, v = (t.detach() for t in _qkv(False))
    band = sparse_attention(q, k, v, SlidingWindow(window=20), tile=32, backend="triton")
    rule = BlockLayout.from_rule(lambda i, j: (i - j).abs() <= 20, N, 32)
    listed = sparse_attention(q, k, v, rule, backend="triton")
    torch.testing.assert_close(listed, band, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(listed.double(), naive_attention(q, k, v, mask=sliding_keep(N, 20)), rtol=1e-5,
                               atol=1e-5)


def test_rules_share_one_dispatch_decision_and_decode_through_the_masked_path(monkeypatch):
    """Dispatch remembers one choice for every rule of a kind (not one per call's rule); a layout decodes (fewer
    queries than keys) through its rule's keep rows."""
    monkeypatch.setattr(sparse_op._SPARSE, "chosen", {})
    q, k, v = _qkv(False)
    for _ in range(3):
        bucket = torch.randint(0, 3, (N,))
        sparse_attention(q, k, v, Rule(keep=lambda i, j, b=bucket: b[i] == b[j]), tile=32)
    assert len(sparse_op._SPARSE.chosen) == 1
    layout = BlockLayout.from_rule(_strided_rule, N, 32, causal=True)
    out = sparse_attention(q[:, :, -3:], k, v, layout)
    assert last_sparse_decision().backend == "masked"
    ref = naive_attention(q[:, :, -3:], k, v, mask=strided_keep(N, 12, True)[-3:])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_layout_that_does_not_fit_the_call_is_refused():
    q, k, v = _qkv(False)
    layout = BlockLayout.from_rule(_strided_rule, N - 1, 32)
    with pytest.raises(ValueError, match="covers 100 positions, k has 101"):
        sparse_attention(q, k, v, layout)
    with pytest.raises(ValueError, match="tile=64: the layout passed as pattern has tile=32"):
        sparse_attention(q, k, v, BlockLayout.from_rule(_strided_rule, N, 32), tile=64)
    with pytest.raises(TypeError, match="keep=3"):
        Rule(keep=3)
