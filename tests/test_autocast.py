"""attnzoo's ops under ``torch.autocast`` behave as SDPA does: mixed q/k/v dtypes (RoPE promotes q and k to
float32 while v stays in the autocast dtype) are cast to the autocast dtype; outside autocast they are an error.
Runs on the CPU's autocast (bf16); the same rule serves CUDA's."""
from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.ops import attention, sparse_attention
from attnzoo.ops.autocast import autocast_inputs
from attnzoo.ops.sparse import SlidingWindow

from hf_tiny import TINY


def _qkv(n=37):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, n, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 2, n, 16, generator=g).bfloat16()
    return q, k[:, :2], v


def test_autocast_inputs_casts_only_floating_non_double_tensors_under_autocast():
    a, b, c, d = torch.randn(3), torch.arange(3), torch.randn(3, dtype=torch.float64), None
    assert autocast_inputs(a, b, c, d) == (a, b, c, d)  # autocast off: the same objects
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a2, b2, c2, d2 = autocast_inputs(a, b, c, d)
    assert a2.dtype == torch.bfloat16 and b2 is b and c2 is c and d2 is None


@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_mixed_dtypes_run_under_autocast_and_equal_the_cast_call(op):
    q, k, v = _qkv()
    run = {"dense": lambda *t: attention(*t, causal=True),
           "sparse": lambda *t: sparse_attention(*t, SlidingWindow(window=7, causal=True))}[op]
    with pytest.raises(TypeError, match="dtypes differ"):
        run(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, run(q.bfloat16(), k.bfloat16(), v), rtol=0, atol=0)


@pytest.mark.parametrize("variant, options", [
    ("gqa", {"groups": 2}), ("sliding_window", {"window": 4}), ("reformer", {"num_hashes": 2, "bucket_size": 4}),
    ("linear", {"feature_map": "hedgehog", "window": 4}), ("performer", {"features": 16}),
    ("mla", {"kv_rank": 16, "rope_dim": 8, "method": "svd"})])
def test_a_patched_llama_trains_under_bf16_autocast(variant, options):
    torch.manual_seed(0)
    model, inputs = TINY["llama"].make()
    attnzoo.patch(model, variant, **options)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
