"""attnzoo.patch on a tiny random model of every architecture in the adapter table."""
import json

import pytest
import torch
from hf_tiny import TINY, VOCAB, main_output, run

import attnzoo
from attnzoo.patches import HFDenseAttention, attention_sites
from attnzoo.patches.adapters import ADAPTERS

NAMES = list(TINY)


def test_every_adapter_model_type_has_a_tiny_model():
    served = {t for a in ADAPTERS for t in a.model_types}
    built = {TINY[n].make()[0].config.model_type for n in NAMES}
    assert served - built <= {"clip_text_model", "clip_vision_model"}  # served through the clip tower table


def _kv(model):
    return [(s.fqn, s.read()) for s in attention_sites(model)[1]]


@pytest.mark.parametrize("name", NAMES)
def test_same_groups_is_lossless(name):
    t = TINY[name]
    model, inputs = t.make()
    ref = run(model, inputs)
    report = attnzoo.patch(model, "gqa", groups=t.kv_heads)
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before
    assert report.params_after == report.params_before
    assert report.native == (name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3"))
    assert len(report.modules) == len(attention_sites(model)[1]) and "KV cache" in str(report)


@pytest.mark.parametrize("name", NAMES)
def test_mha_kernel_swap_is_lossless(name):
    t = TINY[name]
    model, inputs = t.make()
    ref = run(model, inputs)
    report = attnzoo.patch(model, "mha")
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    assert all(p["kv_heads"] == t.heads for p in (model.config.attnzoo["modules"].values() if not report.native
                                                   else []))
    if not report.native:
        assert all(isinstance(s.module, HFDenseAttention) for s in attention_sites(model)[1])
    else:
        assert model.config.num_key_value_heads == t.heads
        assert (model.config._attn_implementation == "attnzoo") == (report.options["kernel"] == "attnzoo")


@pytest.mark.parametrize("name", NAMES)
def test_fewer_groups_is_the_exact_mean_and_trains_and_generates(name):
    t = TINY[name]
    model, inputs = t.make()
    before = _kv(model)
    groups = t.kv_heads // 2
    report = attnzoo.patch(model, "gqa", groups=groups)
    after = _kv(model)
    for (fqn, w0), (fqn1, w1) in zip(before, after):
        assert fqn == fqn1 and w1.kv_heads == groups
        r, hd = w0.kv_heads // groups, w0.head_dim
        for old, new in ((w0.k, w1.k), (w0.v, w1.v), (w0.k_bias, w1.k_bias), (w0.v_bias, w1.v_bias)):
            if old is None:
                assert new is None
                continue
            want = old.double().reshape(groups, r, hd, *old.shape[1:]).mean(1).reshape(new.shape)
            torch.testing.assert_close(new.double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(w1.q, w0.q, rtol=0, atol=0)  # mean leaves Q and O alone
        torch.testing.assert_close(w1.o, w0.o, rtol=0, atol=0)
    assert report.kv_bytes_per_token_after * t.kv_heads == report.kv_bytes_per_token_before * groups
    assert attnzoo.kv_cache_bytes(model, 5) == 5 * report.kv_bytes_per_token_after  # within the tiny windows
    if t.decoder:  # longer than mistral's and gemma2's tiny windows: what the cache really holds
        with torch.no_grad():
            cache = model(input_ids=torch.randint(3, VOCAB, (1, 10)), use_cache=True).past_key_values
        held = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
        assert attnzoo.kv_cache_bytes(model, 10) == held
    # forward and backward
    out = main_output(model(**inputs))
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "k_proj" in n or "key" in n or "c_attn" in n
             or "qkv" in n or "query_key_value" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if not t.decoder:
        return
    # generate() with HF caches: same tokens with and without the cache, and the cache holds `groups` heads
    model.zero_grad(set_to_none=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, **kw, use_cache=True, return_dict_in_generate=True)
        uncached = model.generate(**inputs, **kw, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    layer0 = cached.past_key_values.layers[0]
    assert layer0.keys.shape[1] == groups


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_reproduces_logits(name, tmp_path):
    t = TINY[name]
    model, inputs = t.make()
    report = attnzoo.patch(model, "gqa", groups=t.kv_heads // 2)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if report.native:
        assert "attnzoo" not in config and config["num_key_value_heads"] == t.kv_heads // 2
        again = type(model).from_pretrained(tmp_path).eval()  # plain transformers
    else:
        rec = config["attnzoo"]
        assert rec["variant"] == "gqa" and rec["options"]["groups"] == t.kv_heads // 2
        assert rec["version"] == attnzoo.__version__ and set(rec["modules"]) == set(report.modules)
        again = attnzoo.from_pretrained(tmp_path)
        assert attnzoo.kv_cache_bytes(again.config, 7, dtype=torch.float32) == 7 * report.kv_bytes_per_token_after
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)
    assert attnzoo.kv_cache_bytes(again, 5) == 5 * report.kv_bytes_per_token_after


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt_neox", "gpt2", "bert", "clip"])
def test_svd_method_lossless_at_same_groups_and_runs(name):
    t = TINY[name]
    model, inputs = t.make()
    ref = run(model, inputs)
    attnzoo.patch(model, "gqa", groups=t.kv_heads, method="svd")
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    model, inputs = t.make()
    attnzoo.patch(model, "mqa", method="svd")
    assert torch.isfinite(run(model, inputs)).all()
