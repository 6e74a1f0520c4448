"""The demo: its conversion through attnzoo.patch, pipeline and outputs; the built-in model."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnzoo.cli import main
from attnzoo.data import init_model
from attnzoo.demo.pipeline import OUTPUT_FILES, DemoOptions, convert_gqa, run_demo

from tinylm import pretrained_tiny

def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_demo_conversion_goes_through_attnzoo_patch(tmp_path):
    """The demo converts with attnzoo.patch (the maths is tested in tests/test_conversion*.py)."""
    m = init_model("tiny").eval()
    x = torch.randint(0, 512, (1, 16))
    conv = convert_gqa(m, 2, "svd")
    assert conv.config.num_key_value_heads == 2 and m.config.num_key_value_heads == 4
    conv.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    torch.testing.assert_close(_logits(again, x), _logits(conv, x))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["attnzoo"]["new_modules"] == ["k_proj", "v_proj"]
    assert meta["attnzoo"]["pretraining_tokens"] == 0
    with pytest.raises(ValueError, match="groups=3"):
        convert_gqa(m, 3, "mean")
    with pytest.raises(ValueError, match="method='pool'"):
        convert_gqa(m, 2, "pool")


def test_demo_pipeline_end_to_end_on_a_tiny_model(tmp_path):
    tiny = pretrained_tiny(tmp_path, steps=8)
    out = tmp_path / "new" / "out"  # created, parents too
    s = run_demo(DemoOptions(out=str(out), model=str(tiny), fraction=0.5, eval_seqs=2, seq_len=64,
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
    table = (out / "demo_table.md").read_text()
    assert "| gqa2-mean + distill |" in table
    assert table.splitlines()[0] == "| model | perplexity | gap recovered | recall ppl (uniform: 64) | KV B/token |"
    assert "Recall accuracy is at or below chance" in table and "decode" not in table.splitlines()[0]
    assert all(r["eval"]["decode_tokens_per_s"] is None for r in s["results"])  # not measured: noise here
    assert not list(out.glob(".*tmp*"))


def test_demo_cli_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
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


def _results(ppl, accs):
    names = ["original (MHA)", "gqa2-mean", "gqa2-svd", "gqa2-mean + ce", "gqa2-mean + distill", "gqa2-svd + distill"]
    starts = [None, None, None, "gqa2-mean", "gqa2-mean", "gqa2-svd"]
    return [{"name": n, "from": f, "eval": {"perplexity": p, "recall_perplexity": 64.0, "recall_accuracy": a,
                                            "kv_bytes_per_token": 6144 if i == 0 else 3072}}
            for i, (n, f, p, a) in enumerate(zip(names, starts, ppl, accs))]


def test_demo_table_shows_recall_accuracy_only_when_learned():
    from attnzoo.demo import report

    chance = _results([26.8, 57.6, 36.2, 27.9, 27.6, 27.3], [0.015, 0.003, 0.017, 0.015, 0.01, 0.011])
    assert "recall acc" not in report.columns(chance) and "chance = 1/64" in report.markdown(chance)
    learned = _results([26.8, 57.6, 36.2, 27.9, 27.6, 27.3], [0.9, 0.2, 0.5, 0.8, 0.85, 0.88])
    assert "recall acc" in report.columns(learned) and "chance" not in report.markdown(learned)


def test_demo_figure_legend_clears_the_bars_and_labels():
    """The tallest bar's label (e.g. 57.60) must not hide under the legend."""
    from attnzoo.demo import report

    log = [{"tokens": i * 100, "loss": 4 - i / 10, "ce": 4 - i / 10} for i in range(10)]
    results = _results([26.8, 57.6, 36.2, 27.9, 27.6, 27.3], [0.015] * 6)
    fig = report.figure(results, {r["name"]: log for r in results[3:]})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[1]
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t for t in ax.texts if t.get_text() == "57.60"]
    assert len(labels) == 1
    for artist in labels + list(ax.patches):
        assert not legend.overlaps(artist.get_window_extent(renderer)), artist
    assert ax.get_ylim()[1] > 57.6
