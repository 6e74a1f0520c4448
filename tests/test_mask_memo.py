"""attnzoo.patches.hf.mask_memo: Hugging Face's mask is read once per forward, not once per layer."""
import gc

import pytest
import torch
from hf_tiny import TINY, run

import attnzoo
from attnzoo.patches.hf import mask_memo, pattern_call, wrapper


@pytest.fixture(autouse=True)
def _fresh():
    mask_memo.clear()
    yield
    mask_memo.clear()


def _counter():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)
    return calls, compute


def test_same_tensor_and_key_compute_once():
    t = torch.ones(3)
    calls, compute = _counter()
    assert mask_memo.memoized((t,), "k", compute) == 1
    assert mask_memo.memoized((t,), "k", compute) == 1
    assert mask_memo.memoized((t,), "other key", compute) == 2
    assert mask_memo.memoized((torch.ones(3),), "k", compute) == 3  # equal values, another tensor
    assert len(calls) == 3


def test_an_in_place_write_to_any_of_the_tensors_recomputes():
    a, b = torch.ones(3), torch.ones(2)
    calls, compute = _counter()
    mask_memo.memoized((a, b), "k", compute)
    b[0] = 0.0
    assert mask_memo.memoized((a, b), "k", compute) == 2
    a.add_(1)
    assert mask_memo.memoized((a, b), "k", compute) == 3
    assert mask_memo.memoized((a, None), "k", compute) == 4  # b left out: another call
    assert mask_memo.memoized((a, b), "k", compute) == 5


def test_nothing_outlives_the_mask_and_no_tensor_means_no_memo():
    t = torch.ones(3)
    mask_memo.memoized((None, t), "k", lambda: torch.zeros(10))
    assert len(mask_memo._ENTRIES) == 1
    del t
    gc.collect()
    assert len(mask_memo._ENTRIES) == 0
    calls, compute = _counter()
    mask_memo.memoized((None, None), "k", compute)
    mask_memo.memoized((None, None), "k", compute)
    assert len(calls) == 2


def test_an_error_is_not_remembered():
    t = torch.ones(3)

    def fail():
        raise ValueError("bad mask")
    with pytest.raises(ValueError, match="bad mask"):
        mask_memo.memoized((t,), "k", fail)
    assert mask_memo.memoized((t,), "k", lambda: 7) == 7


@pytest.mark.parametrize("name, mask_kind", [("llama", "2d"), ("gpt2", "2d"), ("llama", "4d-float")])
def test_a_forward_reads_the_mask_once_for_all_layers(monkeypatch, name, mask_kind):
    """A 2-layer model patched with a sliding window: HF's mask is converted and the call planned once per
    forward (not per layer), the next forward with a new mask plans again, and the logits are those of an
    unmemoized run."""
    model, inputs = TINY[name].make()
    attnzoo.patch(model, "sliding_window", window=3)
    n = inputs["input_ids"].shape[1]
    if mask_kind == "4d-float":  # an additive mask of HF's kind: causal window AND padding
        keep = (attnzoo.ops.sparse.SlidingWindow(window=3, causal=True).bind(n).keep_mask()[None, None]
                & inputs["attention_mask"].bool()[:, None, None, :])
        inputs["attention_mask"] = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    counts = {"keep": 0, "plan": 0}
    for fn, attr in ((wrapper, "_keep_of"), (pattern_call, "_plan")):
        real = getattr(fn, attr)

        def spy(*a, _real=real, _k="keep" if attr == "_keep_of" else "plan", **kw):
            counts[_k] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(fn, attr, spy)
    got = run(model, inputs)
    assert counts["plan"] == 1 and counts["keep"] <= 1  # two layers, one analysis
    run(model, {**inputs, "attention_mask": inputs["attention_mask"].clone()})
    assert counts["plan"] == 2
    for module in (wrapper, pattern_call):  # the memo off: every call computes
        monkeypatch.setattr(module, "memoized", lambda tensors, key, compute: compute())
    want = run(model, inputs)
    assert counts["plan"] == 4  # unmemoized: once per layer
    torch.testing.assert_close(got, want, rtol=0, atol=0)
