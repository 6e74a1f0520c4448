"""patch(model, "sliding_window", window=W) on every decoder of the adapter table: float64 references,
the native transformers window (mistral, qwen2, qwen3, gemma2, phi3), reloads, generate(), errors."""
import copy
import json

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, VOCAB, run

import attnzoo
from attnzoo.ops.sparse import SlidingWindow
from attnzoo.patches import HFSparseAttention, attention_sites
from attnzoo.patches.hf import pattern_call

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3", "gpt_neox", "gpt2"]
NATIVE = ["mistral", "qwen2", "qwen3", "gemma2", "phi3"]  # transformers has the window itself
HF_WINDOW = {"mistral": 6, "gemma2": 6}  # tiny configs that already slide (transformers' sliding_window)


@pytest.fixture
def op_calls(monkeypatch):
    """Which op each patched attention call ran: ("sparse" | "dense", q_len, k_len)."""
    calls = []
    for kind, name in (("sparse", "sparse_attention"), ("dense", "attention")):
        real = getattr(pattern_call, name)

        def spy(q, k, v, *args, _real=real, _kind=kind, **kwargs):
            calls.append((_kind, q.shape[2], k.shape[2]))
            return _real(q, k, v, *args, **kwargs)
        monkeypatch.setattr(pattern_call, name, spy)
    return calls


def _ids(n, batch=2, left_pad=3):
    ids = torch.randint(3, VOCAB, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _masked_reference(model, inputs, pattern):
    """HF's own attention (eager or sdpa, as the model runs) with the pattern's dense keep mask AND padding."""
    n = inputs["input_ids"].shape[1]
    keep = pattern.bind(n).keep_mask()[None, None] & inputs["attention_mask"].bool()[:, None, None, :]
    if model.config._attn_implementation == "eager":
        keep = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=keep).logits


@pytest.mark.parametrize("name", DECODERS)
def test_logits_equal_a_float64_reference_with_the_window_mask(name, op_calls):
    model, _ = TINY[name].make()
    model = model.double()
    ref_model = copy.deepcopy(model)
    inputs = _ids(13)
    if name == "gemma2":  # HF's float64 eager softmax runs in float32: a fully padded row gives NaN there
        inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    report = attnzoo.patch(model, "sliding_window", window=3)
    assert report.native == (name in NATIVE) and report.options["window"] == 3
    want = _masked_reference(ref_model, inputs, SlidingWindow(window=3, causal=True))
    with attnzoo.ops.use_sparse_backend("reference"):
        got = run(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)
    if name != "gemma2":  # gemma2 keeps HF's kernel (soft-capping)
        assert op_calls == [("sparse", 13, 13)] * 2  # both layers on the sparse op, padding recovered from HF's mask


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_mask_beyond_padding_runs_dense_with_the_window_and_stays_exact(name, op_calls):
    """Packed sequences (a block-diagonal 4-d mask) are more than padding: the dense op takes mask AND window."""
    model, _ = TINY[name].make()
    model = model.double()
    ref_model = copy.deepcopy(model)
    attnzoo.patch(model, "sliding_window", window=3)
    n = 12
    doc = torch.arange(n) // 5
    packed = ((doc[:, None] == doc[None, :]) & (torch.arange(n)[None, :] <= torch.arange(n)[:, None]))[None, None]
    ids = torch.randint(3, VOCAB, (2, n))
    window = SlidingWindow(window=3, causal=True).bind(n).keep_mask()
    with torch.no_grad():
        want = ref_model(input_ids=ids, attention_mask=(packed & window).expand(2, 1, n, n)).logits
        got = model(input_ids=ids, attention_mask=packed.expand(2, 1, n, n)).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert op_calls == [("dense", n, n)] * 2


@pytest.mark.parametrize("name", list(TINY))
def test_a_window_covering_the_sequence_is_lossless(name):
    model, inputs = TINY[name].make()
    ref = run(model, inputs)
    if name in HF_WINDOW:  # already sliding (gemma2 on its layer 0 only): the same window changes nothing
        attnzoo.patch(model, "sliding_window", window=HF_WINDOW[name] - 1, layers=[0] if name == "gemma2" else None)
    else:
        attnzoo.patch(model, "sliding_window", window=16)  # inputs have 8-9 tokens
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)


def test_window_maps_to_transformers_sliding_window_plus_one(op_calls):
    """attnzoo window=W keeps keys i-W..i; transformers' sliding_window=S keeps S keys (j > i - S): S = W + 1."""
    cfg = dict(TINY["mistral"].build().config.to_dict(), sliding_window=5, attn_implementation="sdpa")
    hf = tf.MistralForCausalLM(tf.MistralConfig(**cfg)).double().eval()  # HF's own sliding window and kernel
    patched = copy.deepcopy(hf)
    report = attnzoo.patch(patched, "sliding_window", window=4)
    assert patched.config.sliding_window == 5 and patched.config._attn_implementation == "attnzoo"
    assert "sliding_window=5" in str(report)
    inputs = _ids(23)  # much longer than the window
    want = run(hf, inputs)
    got = run(patched, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)
    assert op_calls == [("sparse", 23, 23)] * 2  # the window ran on attnzoo's sparse op
    other = copy.deepcopy(hf)
    attnzoo.patch(other, "sliding_window", window=5)  # a different window gives other logits
    assert not torch.allclose(run(other, inputs)[real], want[real])


@pytest.mark.parametrize("name", NATIVE)
def test_native_checkpoint_reloads_in_plain_transformers(name, tmp_path):
    model, _ = TINY[name].make()
    attnzoo.patch(model, "sliding_window", window=4)
    inputs = _ids(15)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "attnzoo" not in config and config["sliding_window"] == 5
    if "layer_types" in config:
        assert set(config["layer_types"]) == {"sliding_attention"}
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, its own kernel
    assert again.config._attn_implementation != "attnzoo"
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma", "olmo", "gpt_neox", "gpt2"])
def test_recorded_patch_is_restored_by_attnzoo_from_pretrained(name, tmp_path):
    model, _ = TINY[name].make()
    report = attnzoo.patch(model, "sliding_window", window=4)
    assert not report.native
    inputs = _ids(15)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    rec = json.loads((tmp_path / "config.json").read_text())["attnzoo"]
    assert rec["variant"] == "sliding_window" and rec["options"]["window"] == 4
    modes = {p["mode"] for p in rec["modules"].values()}
    assert modes == ({"kernel"} if name in ("llama", "gemma", "olmo") else {"swap"})
    again = attnzoo.from_pretrained(tmp_path)
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)
    if modes == {"swap"}:
        assert all(isinstance(s.module, HFSparseAttention) for s in attention_sites(again)[1])
    else:
        assert all(s.module.attnzoo_pattern == SlidingWindow(window=4, causal=True) for s in attention_sites(again)[1])


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi3", "llama", "gemma", "gpt_neox", "gpt2"])
def test_generate_with_the_cache_matches_the_full_forward(name, op_calls):
    model, _ = TINY[name].make()
    attnzoo.patch(model, "sliding_window", window=3)
    inputs = _ids(10)  # prompt longer than the window
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **kw, use_cache=True)
        full = model.generate(**inputs, **kw, use_cache=False)  # every step a full forward
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    layer = cached.past_key_values.layers[0]
    assert layer.keys.shape[2] <= 3  # transformers' sliding-window cache keeps the last `window` tokens
    # cached: the prompt on the sparse op, then one token against window + 1 keys (dense: nothing to skip)
    assert op_calls[:2] == [("sparse", 10, 10)] * 2 and set(op_calls[2:12]) == {("dense", 1, 4)}


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_kv_cache_bytes_match_the_cache_transformers_keeps(name):
    """kv_cache_bytes of a patched decoder (and of its config) equals the bytes of the DynamicCache after a
    prompt longer than the window, and after one shorter; sliding layers count their window, full layers all."""
    model, _ = TINY[name].make()
    attnzoo.patch(model, "sliding_window", window=3)
    for n in (10, 2):
        with torch.no_grad():
            cache = model(input_ids=torch.randint(3, VOCAB, (1, n)), use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert attnzoo.kv_cache_bytes(model, n) == held
        assert attnzoo.kv_cache_bytes(model.config, n, dtype=torch.float32) == held
    assert attnzoo.kv_cache_bytes(model, 10) < 10 * attnzoo.kv_cache_bytes(model, 1)


def test_static_cache_works_when_every_layer_slides_and_is_refused_otherwise():
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    inputs = _ids(10)
    for name in ("llama", "gpt2"):
        model, _ = TINY[name].make()
        attnzoo.patch(model, "sliding_window", window=3)  # transformers' static cache slides too: keys are the last
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, **kw, cache_implementation="static"),
                               model.generate(**inputs, **kw, use_cache=False))
    model, _ = TINY["llama"].make()
    attnzoo.patch(model, "sliding_window", window=3, layers=[0])
    with pytest.raises(ValueError, match="static cache"), torch.no_grad():
        model.generate(**inputs, **kw, cache_implementation="static")


def test_some_layers_native_per_layer_and_kernel_per_module(tmp_path):
    qwen2, _ = TINY["qwen2"].make()
    report = attnzoo.patch(qwen2, "sliding_window", window=2, layers=[1])
    assert report.native and qwen2.config.layer_types == ["full_attention", "sliding_attention"]
    assert qwen2.config.max_window_layers == 1
    inputs = _ids(11)
    want = run(qwen2, inputs)
    qwen2.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(run(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval(), inputs), want,
                               rtol=1e-5, atol=1e-5)
    llama, _ = TINY["llama"].make()
    ref = copy.deepcopy(llama)
    report = attnzoo.patch(llama, "sliding_window", window=2, layers=[0])
    assert not report.native and getattr(llama.config, "sliding_window", None) is None  # the cache stays full
    mods = [s.module for s in attention_sites(llama)[1]]
    assert mods[0].attnzoo_pattern.window == 2 and not hasattr(mods[1], "attnzoo_pattern")
    assert not torch.allclose(run(llama, inputs), run(ref, inputs))
    llama.save_pretrained(tmp_path / "l")
    torch.testing.assert_close(run(attnzoo.from_pretrained(tmp_path / "l"), inputs), run(llama, inputs),
                               rtol=1e-5, atol=1e-5)


def test_gemma2_keeps_hf_kernel_and_bert_slides_both_ways():
    gemma2, _ = TINY["gemma2"].make()
    report = attnzoo.patch(gemma2, "sliding_window", window=3)
    assert report.native and report.options["kernel"] == "hf" and any("soft-capping" in n for n in report.notes)
    assert gemma2.config.layer_types == ["sliding_attention"] * 2 and gemma2.config.sliding_window == 4
    bert, _ = TINY["bert"].make()
    bert = bert.double()
    ref = copy.deepcopy(bert)
    report = attnzoo.patch(bert, "sliding_window", window=2)
    assert not report.native and attention_sites(bert)[1][0].module.pattern == SlidingWindow(window=2, causal=False)
    inputs = _ids(11)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # right padding
    n = 11
    keep = SlidingWindow(window=2).bind(n).keep_mask()[None, None] & inputs["attention_mask"].bool()[:, None, None, :]
    with torch.no_grad():
        want = ref(input_ids=inputs["input_ids"], attention_mask=keep).logits
    with attnzoo.ops.use_sparse_backend("reference"):
        torch.testing.assert_close(run(bert, inputs), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, call, exc, msg", [
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", windw=3), ValueError, "Did you mean 'window'"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", window=0), ValueError, "window=0: expected an integer"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", window=-3), ValueError, "window=-3"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", window="4"), TypeError, "window='4'"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", windw=4), ValueError, "unknown option 'windw'.*'window'"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", window=4, kernel="hf"), ValueError,
     "kernel='hf'.*no sliding window.*llama"),
    ("llama", lambda m: attnzoo.patch(m, "sliding_window", window=4, kernel="flash"), ValueError, "kernel='flash'"),
    ("mistral", lambda m: attnzoo.patch(m, "sliding_window", window=4, layers=[0]), ValueError,
     "one sliding_window for every layer.*sliding_window=6"),
    ("gemma2", lambda m: attnzoo.patch(m, "sliding_window", window=4, layers=[1]), ValueError,
     r"sliding_window=6, i.e. window=5, on layers \[0\]"),
    ("gemma2", lambda m: attnzoo.patch(m, "sliding_window", window=4, kernel="attnzoo"), ValueError, "soft-capping"),
    ("gpt2", lambda m: attnzoo.patch(m, "slidingwindow", window=4), ValueError, "Did you mean 'sliding_window'"),
])
def test_bad_options_raise_before_anything_changes(name, call, exc, msg):
    model, inputs = TINY[name].make()
    ref = run(model, inputs)
    with pytest.raises(exc, match=msg):
        call(model)
    torch.testing.assert_close(run(model, inputs), ref)
    assert getattr(model.config, "attnzoo", None) is None
