"""The flash_attn_cute sparse backend (band patterns through FlashAttention-4's public flash_attn_func with
window_size): which calls it takes, and its adapter (layouts, window bounds, grouped heads) against the float64
oracle through a stand-in module with FlashAttention's documented local-attention semantics. The real kernels:
tests/test_sparse_gpu.py (skipped without flash-attn-4)."""
import sys
import types

import pytest
import torch

from attnzoo.ops.sparse import BigBird, Longformer, SlidingWindow
from attnzoo.ops.sparse.call import SparseCall
from attnzoo.ops.sparse.flash_attn_cute import band_reason, flash_attn_cute_band

from oracle import naive_attention


def _fake_cute(calls):
    """flash_attn.cute.flash_attn_func with local windows: query i sees keys i - left .. i + right (None: no bound),
    [B, N, H, D] layout, grouped KV heads, in float64."""
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None)):
        calls.append(window_size)
        n = q.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        left, right = window_size
        keep = torch.ones(n, n, dtype=torch.bool)
        if left is not None:
            keep &= j >= i - left
        if right is not None:
            keep &= j <= i + right
        if causal:
            keep &= j <= i
        out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=keep,
                              scale=softmax_scale)
        return out.transpose(1, 2).to(q.dtype), None  # (out, lse) as flash_attn.cute returns
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    return cute


@pytest.mark.parametrize("pattern", [SlidingWindow(window=5), SlidingWindow(window=7, causal=True),
                                     Longformer(window=4, global_tokens=0)], ids=["bidirectional", "causal", "lf0"])
def test_adapter_matches_the_oracle(monkeypatch, pattern):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fake_cute(calls))
    n = 37
    q = torch.randn(2, 4, n, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(2))
    lo, hi = pattern.band()
    out = flash_attn_cute_band(q, k, v, lo, hi, scale=0.3)
    assert calls == [(-lo, hi)]
    keep = pattern.bind(n).keep_mask()
    torch.testing.assert_close(out, naive_attention(q, k, v, mask=keep, scale=0.3))


@pytest.mark.parametrize("pattern, kw, words", [
    (BigBird(block_size=16, window=16, random_blocks=1), {}, "is not a band"),
    (Longformer(window=4, global_tokens=1), {}, "global tokens"),
    (SlidingWindow(window=4), {"key_padding_mask": torch.ones(1, 40, dtype=torch.bool)}, "key padding"),
    (SlidingWindow(window=4), {"dropout_p": 0.1}, "dropout"),
    (SlidingWindow(window=4), {"dtype": torch.float32}, "float16/bfloat16"),
    (SlidingWindow(window=4), {"head_dim": 12}, "multiple of 8"),
    (SlidingWindow(window=4), {}, "needs CUDA"),
])
def test_which_calls_it_takes(pattern, kw, words):
    dtype, hd = kw.pop("dtype", torch.bfloat16), kw.pop("head_dim", 16)
    q = torch.randn(1, 2, 40, hd, dtype=dtype)
    call = SparseCall.build(q, q, q, pattern, **kw)
    assert words in band_reason(call)


def test_deterministic_mode_is_a_reason():
    q = torch.randn(1, 2, 40, 16, dtype=torch.bfloat16)
    call = SparseCall.build(q, q, q, SlidingWindow(window=4))
    torch.use_deterministic_algorithms(True)
    try:
        assert "use_deterministic_algorithms" in band_reason(call)
    finally:
        torch.use_deterministic_algorithms(False)
