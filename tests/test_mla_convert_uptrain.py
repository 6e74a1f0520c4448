"""Converted MLA models uptrain like GQA ones (distillation + LoRA on DeepSeek's module names), and the demo runs
--to mla on a tiny pretrained model."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnzoo.conversion.pipeline import convert_checkpoint
from attnzoo.demo.pipeline import DemoOptions, run_demo
from attnzoo.uptrain import UptrainOptions, uptrain

from tinylm import pretrained_tiny, weights

SMALL = dict(batch_size=2, seq_len=32, lr=3e-3, progress=False, cpu=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return pretrained_tiny(tmp_path_factory.mktemp("tiny"), steps=6)


def test_deepseek_export_uptrains_with_distillation_and_lora(tiny, tmp_path):
    conv = tmp_path / "mla"
    res = convert_checkpoint(tiny, conv, "mla", {"kv_rank": 24, "rope_dim": 8, "method": "svd"}, progress=False)
    assert res.native and json.loads((conv / "config.json").read_text())["model_type"] == "deepseek_v3"
    meta = json.loads((conv / "config.json").read_text())["attnzoo"]
    assert meta["new_modules"] == ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj"] and "variant" not in meta
    r = uptrain(UptrainOptions(model=str(conv), out=str(tmp_path / "up"), tokens=3 * 2 * 32, teacher=str(tiny),
                               alpha=0.5, lora_rank=2, **SMALL))
    text = r.trainable.describe()
    # peft (0.21) remaps gate/up/down_proj of a deepseek_v3 model to MoE expert parameters, which dense layers do not
    # have: LoRA lands on o_proj only, the MLP stays frozen (docs/mla-conversion.md)
    assert "LoRA on o_proj" in text
    assert "trained fully: kv_a_proj_with_mqa, kv_b_proj, q_proj" in text
    before, after = weights(conv), weights(tmp_path / "up")
    assert set(after) == set(before)
    k = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(before[k], after[k])  # LoRA delta merged in
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "up"))
    assert type(out).__name__ == "DeepseekV3ForCausalLM"


def test_demo_to_mla_end_to_end(tiny, tmp_path):
    s = run_demo(DemoOptions(out=str(tmp_path / "out"), model=str(tiny), to="mla", fraction=0.5, eval_seqs=2,
                             seq_len=64, batch_size=2, progress=False))
    names = [r["name"] for r in s["results"]]
    label = s["target"]
    assert label.startswith("mla") and names == ["original (MHA)", f"{label}-svd", f"{label}-pca",
                                                 f"{label}-svd + ce", f"{label}-svd + distill",
                                                 f"{label}-pca + distill"]
    kv = [r["eval"]["kv_bytes_per_token"] for r in s["results"]]
    assert kv[1] < 0.32 * kv[0] and len(set(kv[1:])) == 1  # the -68.75% budget, kept by uptraining
    assert all(r["eval"]["perplexity"] > 0 for r in s["results"])
