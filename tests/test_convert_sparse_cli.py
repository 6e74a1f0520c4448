"""`attnzoo convert --to sliding_window | longformer | bigbird` on tiny saved checkpoints: same weights and
logits as patch(), SRC untouched, native reloads in plain transformers, recorded ones in attnzoo, errors."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from hf_tiny import TINY, VOCAB, run

import attnzoo
from attnzoo.cli import main


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _save(name, d: Path, **kw):
    model, _ = TINY[name].make()
    model.save_pretrained(d, **kw)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "fake": True}))
    (d / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny source\n")
    return model


def _inputs(n, right_pad=False):
    ids = torch.randint(3, VOCAB, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    if right_pad:
        mask[1, -2:] = 0
        ids[1, -2:] = 1
    else:
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_native_sliding_window_streams_and_reloads_in_plain_transformers(name, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _save(name, src, max_shard_size="40KB")
    before = _hashes(src)
    assert main(["convert", str(src), str(dst), "--to", "sliding_window", "--window", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "native transformers (streamed" in out and "config.json only" in out and "sliding_window=4" in out
    assert _hashes(src) == before
    for f in src.glob("*.safetensors"):  # every tensor copied byte for byte
        assert (dst / f.name).read_bytes() == f.read_bytes()
    config = json.loads((dst / "config.json").read_text())
    assert config["sliding_window"] == 4 and "attnzoo" not in config
    card = (dst / "README.md").read_text()
    assert "license: mit" in card and "sliding_window" in card and "window=3" in card
    attnzoo.patch(model, "sliding_window", window=3)
    inputs = _inputs(11)
    again = tf.AutoModelForCausalLM.from_pretrained(dst).eval()
    torch.testing.assert_close(run(again, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


def test_recorded_sliding_window_for_llama_and_gpt2(tmp_path):
    for name in ("llama", "gpt2"):
        src, dst = tmp_path / f"{name}-src", tmp_path / f"{name}-dst"
        model = _save(name, src)
        before = _hashes(src)
        assert main(["convert", str(src), str(dst), "--to", "sliding_window", "--window", "2", "--no-progress"]) == 0
        assert _hashes(src) == before
        assert json.loads((dst / "config.json").read_text())["attnzoo"]["options"]["window"] == 2
        attnzoo.patch(model, "sliding_window", window=2)
        inputs = _inputs(9)
        torch.testing.assert_close(run(attnzoo.from_pretrained(dst), inputs), run(model, inputs), rtol=1e-5,
                                   atol=1e-5)


def test_longformer_with_positions_and_global_projections(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _save("roberta", src)
    before = _hashes(src)
    assert main(["convert", str(src), str(dst), "--to", "longformer", "--window", "3", "--global-tokens", "1",
                 "--max-positions", "100", "--global-projections", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "40 -> 102 rows" in out and "model_max_length 512 -> 100" in out
    assert _hashes(src) == before
    assert sorted(p.name for p in dst.glob("*.safetensors")) == ["model.safetensors"] and not list(dst.glob("*.bin"))
    config = json.loads((dst / "config.json").read_text())
    assert config["max_position_embeddings"] == 102 and config["attnzoo"]["variant"] == "longformer"
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {"model_max_length": 100, "fake": True}
    attnzoo.patch(model, "longformer", window=3, global_tokens=1, max_positions=100, global_projections=True)
    inputs = _inputs(60, right_pad=True)  # beyond the original 38 positions
    again = attnzoo.from_pretrained(dst)
    torch.testing.assert_close(run(again, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    sd = again.state_dict()
    assert any("q_global_proj" in k for k in sd)


def test_bigbird_and_dry_run(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _save("bert", src)
    assert main(["convert", str(src), str(dst), "--to", "bigbird", "--block-size", "4", "--random-blocks", "1",
                 "--seed", "5", "--max-positions", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "encoder.layer.*.attention.self.q_proj.weight" in out and not dst.exists()
    assert main(["convert", str(src), str(dst), "--to", "bigbird", "--block-size", "4", "--random-blocks", "1",
                 "--seed", "5", "--max-positions", "64", "--no-progress"]) == 0
    attnzoo.patch(model, "bigbird", block_size=4, random_blocks=1, seed=5, max_positions=64)
    inputs = _inputs(45, right_pad=True)
    torch.testing.assert_close(run(attnzoo.from_pretrained(dst), inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, args, msg", [
    ("mistral", ["--to", "sliding_window", "--window", "-2"], "window=-2: expected an integer >= 1"),
    ("llama", ["--to", "sliding_window", "--window", "0"], "window=0: expected an integer >= 1"),
    ("bert", ["--to", "longformer", "--global-projections", "--max-positions", "0"], "max_positions=0"),
    ("bert", ["--to", "longformer", "--window", "2", "--max-positions", "8"], "max_positions=8: smaller than the 32"),
    ("bert", ["--to", "gqa", "--groups", "2", "--window", "4"], "--window does not apply to --to gqa"),
    ("bert", ["--to", "longformer", "--window", "2", "--groups", "2"], "--groups does not apply to --to longformer"),
    ("bert", ["--to", "sliding_window", "--window", "2", "--block-size", "4"], "--block-size does not apply to --to sliding_window"),
    ("llama", ["--to", "bigbird", "--block-size", "4"], "is causal"),
    ("bert", ["--to", "bigbird", "--block-size", "4", "--window", "6"], "multiple of block_size=4"),
    ("bert", ["--to", "longform", "--window", "2"], "Did you mean 'longformer'"),
])
def test_bad_options_exit_2_and_write_nothing(name, args, msg, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save(name, src)
    before = _hashes(src)
    assert main(["convert", str(src), str(dst), *args, "--no-progress"]) == 2
    assert msg in capsys.readouterr().err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]
    assert _hashes(src) == before
