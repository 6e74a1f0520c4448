"""Cached decoding after every kind of patch, on every architecture of the adapter table that generates.

For each (architecture, patch): one cached decoding step gives the full forward's logits of the last position,
the cache really holds the keys (transformers 5.25 renamed the cache keyword; a module that misses it silently
recomputes without the past), and ``generate()`` gives the same tokens with and without the cache. CI runs this
file on the newest and the oldest transformers the declared range admits (.ci/run).
"""
from __future__ import annotations

import pytest
import torch
from hf_tiny import TINY, VOCAB

import attnzoo
from attnzoo.hf_compat import model_cache_kwarg, output_cache

DECODERS = [n for n, t in TINY.items() if t.decoder]


def _patches(t):
    yield "mha", {}
    yield "gqa", {"groups": max(t.kv_heads // 2, 1)}
    yield "mqa", {}
    yield "sliding_window", {"window": 3}


CASES = [(n, kind, opts) for n in DECODERS for kind, opts in _patches(TINY[n])]


@pytest.mark.parametrize("name,kind,opts", CASES, ids=[f"{n}-{k}" for n, k, _ in CASES])
def test_cached_decoding_equals_the_full_forward(name, kind, opts):
    torch.manual_seed(0)
    t = TINY[name]
    model, inputs = t.make()
    attnzoo.patch(model, kind, **opts)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    nxt = torch.randint(3, VOCAB, (ids.shape[0], 1))
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        want = model(input_ids=full_ids, attention_mask=full_mask).logits[:, -1]
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(first)
        assert cache is not None
        layers = getattr(cache, "layers", None)
        if layers is not None:  # the cache holds what the patched modules stored (not an empty layer)
            assert all(layer.keys is not None and layer.keys.numel() > 0 for layer in layers)
        step = model(input_ids=nxt, attention_mask=full_mask, use_cache=True, **{model_cache_kwarg(model): cache})
    torch.testing.assert_close(step.logits[:, -1], want, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, **kw, use_cache=True)
        uncached = model.generate(**inputs, **kw, use_cache=False)
    assert torch.equal(cached, uncached)
