"""attnzoo.patch: selecting layers, records, errors."""
import dataclasses
from typing import ClassVar

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, run

import attnzoo
from attnzoo.errors import AttnzooError, NoMatchingModuleError, UnknownVariantError, UnsupportedArchitectureError
from attnzoo.patches import HFDenseAttention, attention_sites
from attnzoo.patches.kv_heads import DenseConverter


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_layers_and_filter_fn_select_modules(name, tmp_path):
    t = TINY[name]
    model, inputs = t.make()
    report = attnzoo.patch(model, "mqa", layers=[1])
    assert report.modules == [attention_sites(model)[1][1].fqn] and not report.native
    kv = [s.kv_heads for s in attention_sites(model)[1]]
    assert kv == [t.kv_heads, 1]
    assert model.config.attnzoo["kv_layout"] == [{"kv_heads": t.kv_heads if i == 0 else 1, "head_dim": s.head_dim}
                                                 for i, s in enumerate(attention_sites(model)[1])]
    if name == "llama":  # the HF module stays, resized; config.num_key_value_heads is untouched
        assert model.config.num_key_value_heads == t.kv_heads
        assert not isinstance(attention_sites(model)[1][1].module, HFDenseAttention)
    want = run(model, inputs)
    model.save_pretrained(tmp_path)
    again = attnzoo.from_pretrained(tmp_path)
    torch.testing.assert_close(run(again, inputs), want, rtol=1e-5, atol=1e-5)
    assert [s.kv_heads for s in attention_sites(again)[1]] == kv
    if name == "llama":
        with torch.no_grad():
            out = again.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3

    model, _ = t.make()
    report = attnzoo.patch(model, "gqa", groups=t.kv_heads // 2, filter_fn=lambda m, fqn: fqn.endswith(("0.attn",
                                                                                                  "0.self_attn")))
    assert len(report.modules) == 1 and report.modules[0].split(".")[-2] == "0"


def test_patching_twice_raises_even_after_reload(tmp_path):
    model, _ = TINY["gpt2"].make()
    attnzoo.patch(model, "mqa")
    with pytest.raises(AttnzooError, match="already patched.*mqa"):
        attnzoo.patch(model, "gqa", groups=2)
    model.save_pretrained(tmp_path)
    with pytest.raises(AttnzooError, match="already patched"):
        attnzoo.patch(attnzoo.from_pretrained(tmp_path), "mqa")
    llama, _ = TINY["llama"].make()
    attnzoo.patch(llama, "mqa")
    with pytest.raises(AttnzooError, match="already patched"):
        attnzoo.patch(llama, "mqa")


def test_a_native_checkpoint_can_be_converted_again(tmp_path):
    model, _ = TINY["llama"].make()
    attnzoo.patch(model, "gqa", groups=2)
    model.save_pretrained(tmp_path)
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    report = attnzoo.patch(again, "mqa")
    assert report.native and again.config.num_key_value_heads == 1


def test_unsupported_architecture_lists_the_supported_ones():
    cfg = tf.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='t5'.*gpt2.*llama.*phi3"):
        attnzoo.patch(tf.T5Model(cfg), "mqa")
    with pytest.raises(TypeError, match="expected a Hugging Face transformers model"):
        attnzoo.patch(torch.nn.Linear(2, 2), "mqa")


def test_nothing_matched_raises():
    model, _ = TINY["gpt2"].make()
    with pytest.raises(NoMatchingModuleError, match="no attention module matched.*transformer.h.0.attn"):
        attnzoo.patch(model, "mqa", filter_fn=lambda m, fqn: False)
    with pytest.raises(NoMatchingModuleError):
        attnzoo.patch(model, "mqa", layers=[])
    with pytest.raises(ValueError, match=r"layers=\[5\].*valid indices: 0..1"):
        attnzoo.patch(model, "mqa", layers=[5])
    assert not hasattr(model.config, "attnzoo")  # nothing changed


@pytest.mark.parametrize("call, exc, msg", [
    (lambda m: attnzoo.patch(m, "gqa", groups=3), ValueError, r"groups=3: must divide the 8 query heads.*\[1, 2, 4, 8\]"),
    (lambda m: attnzoo.patch(m, "gqa"), ValueError, "needs groups"),
    (lambda m: attnzoo.patch(m, "gqa", groups=0), ValueError, "groups=0"),
    (lambda m: attnzoo.patch(m, "gqa", groups="2"), TypeError, "groups='2'"),
    (lambda m: attnzoo.patch(m, "mqa", groups=2), ValueError, "groups must be 1"),
    (lambda m: attnzoo.patch(m, "mha", groups=2), ValueError, "groups must equal heads=8"),
    (lambda m: attnzoo.patch(m, "gqaa", groups=2), UnknownVariantError, "Did you mean 'gqa'"),
    (lambda m: attnzoo.patch(m, "gqa", group=2), ValueError, "unknown option 'group'.*Did you mean 'groups'"),
    (lambda m: attnzoo.patch(m, "gqa", groups=2, method="avg"), ValueError, "method='avg'.*'mean', 'svd'"),
    (lambda m: attnzoo.patch(m, "gqa", groups=2, kernel="flash"), ValueError, "kernel='flash'"),
])
def test_bad_options_name_option_value_and_choices(call, exc, msg):
    model, inputs = TINY["llama"].make()
    ref = run(model, inputs)
    with pytest.raises(exc, match=msg):
        call(model)
    torch.testing.assert_close(run(model, inputs), ref)  # untouched


def test_groups_must_pool_whole_kv_heads():
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=12, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"groups=6: .* 4 KV heads.*valid groups: \[1, 2, 4, 12\]"):
        attnzoo.patch(tf.LlamaForCausalLM(cfg), "gqa", groups=6)


def test_architecture_specific_refusals():
    qwen3, _ = TINY["qwen3"].make()
    with pytest.raises(ValueError, match="method='svd'.*qwen3 normalises keys per head.*method='mean'"):
        attnzoo.patch(qwen3, "mqa", method="svd")
    gpt2, _ = TINY["gpt2"].make()
    with pytest.raises(ValueError, match="kernel='hf'.*gpt2 modules are replaced"):
        attnzoo.patch(gpt2, "mqa", kernel="hf")
    gemma2, _ = TINY["gemma2"].make()
    with pytest.raises(ValueError, match="kernel='attnzoo' cannot serve.*soft-capping"):
        attnzoo.patch(gemma2, "mqa", kernel="attnzoo")
    report = attnzoo.patch(gemma2, "mqa")
    assert report.options["kernel"] == "hf" and any("soft-capping" in n for n in report.notes)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        attnzoo.patch(tf.GPT2LMHeadModel(cfg), "mqa")


def test_kernel_hf_keeps_hf_attention_and_is_native():
    model, _ = TINY["llama"].make()
    impl = model.config._attn_implementation
    report = attnzoo.patch(model, "mqa", kernel="hf")
    assert report.native and model.config._attn_implementation == impl


def test_attnzoo_kernel_serves_native_models():
    model, inputs = TINY["mistral"].make()
    ref = run(model, inputs)
    attnzoo.patch(model, "mha")
    with attnzoo.ops.use_backend("eager"), attnzoo.ops.use_sparse_backend("masked"):
        torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
        assert attnzoo.ops.last_decision().backend == "eager"  # the call went through attnzoo.ops
        # mistral's sliding_window=6 binds at 9 tokens: the window runs on the sparse op (masked -> dense op)
        assert attnzoo.ops.last_sparse_decision().backend == "masked"


def test_a_new_converter_plugs_in_without_touching_the_walker():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class TwiceConfig(attnzoo.MHA):
        variant: ClassVar[str] = "twice_test"

    class Twice(DenseConverter):
        def plan(self, site, opts):
            return {**super().plan(site, {**opts, "groups": site.heads}), "note": "custom"}

    attnzoo.register("twice_test", attnzoo.variants.MHAConfig, converter=Twice(TwiceConfig))(
        attnzoo.variants.DenseAttention)
    try:
        model, _ = TINY["gpt2"].make()
        report = attnzoo.patch(model, "twice_test")
        assert report.variant == "twice_test"
        assert all(p["note"] == "custom" for p in model.config.attnzoo["modules"].values())
    finally:
        del attnzoo.registry._REGISTRY["twice_test"]


def test_report_and_kv_cache_bytes_numbers():
    model, _ = TINY["llama"].make()  # 2 layers, 8 heads, 4 KV heads, head_dim 8, float32
    report = attnzoo.patch(model, "gqa", groups=2)
    assert report.kv_bytes_per_token_before == 2 * 2 * 4 * 8 * 4
    assert report.kv_bytes_per_token_after == 2 * 2 * 2 * 8 * 4
    assert report.kv_saving == pytest.approx(0.5)
    assert report.params_before - report.params_after == 2 * 2 * (2 * 8) * (64 + 1)  # k,v weights+biases
    assert attnzoo.kv_cache_bytes(model, 100, batch=2, dtype=torch.bfloat16) == 100 * 2 * 2 * 2 * 2 * 8 * 2


def test_kv_cache_bytes_names_a_bad_dtype_string():
    cfg = tf.LlamaConfig(num_hidden_layers=1)
    with pytest.raises(ValueError, match="dtype='bfloat17'"):
        attnzoo.kv_cache_bytes(cfg, 4, dtype="bfloat17")


@pytest.mark.parametrize("config, name, options", [
    (attnzoo.GQA(groups=2), "gqa", {"groups": 2}),
    (attnzoo.MQA(method="svd"), "mqa", {"method": "svd"}),
    (attnzoo.SlidingWindow(window=3), "sliding_window", {"window": 3}),
])
def test_typed_configs_are_the_string_path(config, name, options):
    """patch(model, attnzoo.GQA(groups=2)) and patch(model, "gqa", groups=2): same record, same logits."""
    a, inputs = TINY["gpt2"].make()
    b, _ = TINY["gpt2"].make()
    b.load_state_dict(a.state_dict())
    ra, rb = attnzoo.patch(a, config), attnzoo.patch(b, name, **options)
    assert ra.options == rb.options and a.config.attnzoo == b.config.attnzoo
    torch.testing.assert_close(run(a, inputs), run(b, inputs), rtol=0, atol=0)


def test_typed_config_errors():
    with pytest.raises(ValueError, match="gqa needs groups"):
        attnzoo.GQA()
    with pytest.raises(ValueError, match="groups=2: mqa keeps one KV head"):
        attnzoo.MQA(groups=2)
    with pytest.raises(ValueError, match="method='magic'"):
        attnzoo.GQA(groups=2, method="magic")
    with pytest.raises(TypeError):
        attnzoo.GQA(2)  # keyword-only, as torchao's configs
    model, _ = TINY["gpt2"].make()
    with pytest.raises(TypeError, match="not both"):
        attnzoo.patch(model, attnzoo.GQA(groups=2), method="svd")
