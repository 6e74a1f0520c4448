"""The demo: its local MHA->GQA conversion (to be replaced by attnzoo.patch), pipeline and outputs; the built-in model."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnzoo.cli import main
from attnzoo.data import init_model
from attnzoo.demo.kv_pooling import convert_gqa, meanpool_kv, svd_key_rope, svd_value
from attnzoo.demo.pipeline import OUTPUT_FILES, DemoOptions, run_demo

from tinylm import pretrained_tiny

D = 8  # head_dim of the tiny preset (32 / 4)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _edit_heads(model, fn):
    sd = model.state_dict()
    for k in sd:
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            fn(k, sd[k].view(4, D, -1))
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("method", ["mean", "svd"])
def test_conversion_is_lossless_with_nothing_to_lose(method):
    m = init_model("tiny").eval()
    x = torch.randint(0, 512, (2, 24))
    same = convert_gqa(m, 4, method)
    torch.testing.assert_close(_logits(same, x), _logits(m, x), rtol=0, atol=1e-5)

    def pair_up(k, w):  # heads 0,1 identical and 2,3 identical: pooling loses nothing
        w[1], w[3] = w[0].clone(), w[2].clone()

    _edit_heads(m, pair_up)
    conv = convert_gqa(m, 2, method)
    assert conv.config.num_key_value_heads == 2 and m.config.num_key_value_heads == 4
    torch.testing.assert_close(_logits(conv, x), _logits(m, x), rtol=0, atol=1e-5)


def test_meanpool_is_the_mean_of_each_group():
    w = torch.arange(4 * D * 3, dtype=torch.float32).reshape(4 * D, 3)
    pooled = meanpool_kv(w, 4, 2)
    torch.testing.assert_close(pooled[:D], (w[:D] + w[D:2 * D]) / 2)
    torch.testing.assert_close(pooled[D:], (w[2 * D:3 * D] + w[3 * D:]) / 2)


def test_svd_is_exact_when_heads_differ_by_a_rope_commuting_map():
    torch.manual_seed(0)
    m = init_model("tiny").eval()

    def relate(k, w):  # head 1 = head 0 up to a per-frequency complex scale (K) / an invertible map (V)
        if "k_proj" in k:
            z = torch.complex(w[0, :D // 2], w[0, D // 2:]) * (2 * torch.exp(1j * torch.rand(D // 2, 1) * 6))
            w[1] = torch.cat([z.real, z.imag]).float()
        else:
            w[1] = torch.randn(D, D) @ w[0]

    _edit_heads(m, relate)
    x = torch.randint(0, 512, (2, 24))
    ref = _logits(m, x)
    svd_err = (_logits(convert_gqa(m, 2, "svd"), x) - ref).abs().max()
    mean_err = (_logits(convert_gqa(m, 2, "mean"), x) - ref).abs().max()
    # heads 2,3 still differ, so neither is exact; svd only loses on them
    assert svd_err < mean_err


def test_svd_factors_are_the_best_fit_and_fix_identical_heads():
    b = torch.randn(3, 16, 12, dtype=torch.float64)  # 3 heads' value paths, D_out=16, D=12
    y, x = svd_value(b, 3, D)
    torch.testing.assert_close(y @ y.T, torch.eye(D, dtype=torch.float64))
    err = ((x @ y - b) ** 2).sum()
    best = torch.linalg.svdvals(b.reshape(-1, 12))
    assert float(err) == pytest.approx(float((best[D:] ** 2).sum()), rel=1e-6)
    z = torch.complex(torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64))
    w, u = svd_key_rope(torch.stack([z, z]), torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(w, z)
    torch.testing.assert_close(u, torch.ones(2, dtype=u.dtype))
    w, u = svd_key_rope(torch.stack([z, (2 - 1j) * z]), torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(u[0] * w, z)  # exact: the rows differ by a complex scale
    torch.testing.assert_close(u[1] * w, (2 - 1j) * z)


def test_svd_with_calibration_is_lossless_with_nothing_to_lose():
    from attnzoo.data import BuiltinCorpus

    m = init_model("tiny").eval()
    x = torch.randint(0, 512, (2, 24))
    calib = BuiltinCorpus(0, 32).batch(range(4))
    same = convert_gqa(m, 4, "svd", calibration=calib)
    torch.testing.assert_close(_logits(same, x), _logits(m, x), rtol=0, atol=1e-5)
    assert json.loads(same.config.to_json_string())["attnzoo"]["patch"]["calibration_tokens"] == 4 * 32


def test_converted_model_is_native_hf(tmp_path):
    m = init_model("tiny").eval()
    conv = convert_gqa(m, 2, "svd")
    conv.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    x = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(_logits(again, x), _logits(conv, x))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["num_key_value_heads"] == 2
    assert meta["attnzoo"]["patch"] == {"name": "gqa", "groups": 2, "method": "svd", "from_kv_heads": 4,
                                      "calibration_tokens": 0}
    assert meta["attnzoo"]["pretraining_tokens"] == 0


def test_conversion_errors():
    m = init_model("tiny")
    with pytest.raises(ValueError, match=r"groups=3: must divide the model's 4 KV heads; valid groups: \[1, 2, 4\]"):
        convert_gqa(m, 3)
    with pytest.raises(ValueError, match="method='pool': expected one of 'mean', 'svd'"):
        convert_gqa(m, 2, "pool")


def test_demo_pipeline_end_to_end_on_a_tiny_model(tmp_path):
    tiny = pretrained_tiny(tmp_path, steps=8)
    out = tmp_path / "out"
    out.mkdir()
    s = run_demo(DemoOptions(out=str(out), model=str(tiny), fraction=0.5, eval_seqs=2, decode_tokens=2, seq_len=64,
                             batch_size=2, progress=False))
    names = [r["name"] for r in s["results"]]
    assert names == ["original (MHA)", "gqa2-mean", "gqa2-svd", "gqa2-mean + ce", "gqa2-mean + distill",
                     "gqa2-svd + distill"]
    kv = [r["eval"]["kv_bytes_per_token"] for r in s["results"]]
    assert kv[0] == 2 * kv[1] and len(set(kv[1:])) == 1
    assert all(r["tokens"] <= 0.5 * s["pretraining_tokens"] for r in s["results"][3:])
    assert len({r["tokens"] for r in s["results"][3:]}) == 1  # same budget for every uptraining run
    for f in OUTPUT_FILES:
        assert (out / f).is_file()
    assert "| gqa2-mean + distill |" in (out / "demo_table.md").read_text()
    assert not list(out.glob(".*tmp*"))


def test_demo_cli_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "nope")]) == 2
    assert "--out=" in capsys.readouterr().err
    assert main(["demo", "--fraction", "0"]) == 2
    assert "--fraction=0.0" in capsys.readouterr().err


def test_builtin_model_ships_small_and_loads_with_plain_hf():
    from attnzoo.data import builtin_model_dir

    path = builtin_model_dir()
    pkg = Path(path).parents[1]
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size < 20 * 2 ** 20, f"the attnzoo package is {size / 2 ** 20:.1f} MiB"
    model = AutoModelForCausalLM.from_pretrained(str(path))
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == cfg.num_attention_heads == 4
    assert cfg.attnzoo["pretraining_tokens"] > 0 and (path / "README.md").is_file()
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7
