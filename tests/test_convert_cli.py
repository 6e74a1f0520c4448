"""`attnzoo convert` and `attnzoo info` on tiny checkpoints: streaming == in-memory patch, safety, errors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import TINY, run
from safetensors.torch import load_file

import attnzoo
from attnzoo.cli import main


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _state(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _no_leftovers(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.attnzoo-")]


def _save(name, d: Path, **kw):
    model, inputs = TINY[name].make()
    model.save_pretrained(d, **kw)
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (d / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# tiny source\n\nSome card.\n")
    return model, inputs


@pytest.mark.parametrize("name, method", [("llama", "mean"), ("llama", "svd"), ("phi3", "mean"), ("phi3", "svd"),
                                          ("qwen2", "mean")])
def test_streaming_equals_in_memory_patch_sharded_tied(name, method, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model, inputs = _save(name, src, max_shard_size="30KB")
    assert (src / "model.safetensors.index.json").exists()
    before = _hashes(src)
    rc = main(["convert", str(src), str(dst), "--to", "gqa", "--groups", "2", "--method", method, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "KV cache" in out and "50.0% saved" in out
    assert _hashes(src) == before  # SRC byte-identical
    attnzoo.patch(model, "gqa", groups=2, method=method)
    want = {k: v for k, v in model.state_dict().items()}
    got = _state(dst)
    for k, t in got.items():
        assert torch.equal(t, want[k]), k
    assert set(want) - set(got) <= {"lm_head.weight"}  # tied, not stored
    config = json.loads((dst / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and "attnzoo" not in config
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in got.values())
    assert (dst / "tokenizer.json").read_text() == '{"fake": "tokenizer"}' and (dst / "generation_config.json").exists()
    card = (dst / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\ntags:") and "KV heads" in card and "Some card." in card
    again = type(model).from_pretrained(dst).eval()  # plain transformers
    torch.testing.assert_close(run(again, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_non_native_goes_through_patch_and_reloads(name, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model, inputs = _save(name, src)
    before = _hashes(src)
    assert main(["convert", str(src), str(dst), "--to", "mqa", "--no-progress"]) == 0
    assert "attnzoo.from_pretrained" in capsys.readouterr().out
    assert _hashes(src) == before
    attnzoo.patch(model, "mqa")
    got = _state(dst)
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v), k
    assert json.loads((dst / "config.json").read_text())["attnzoo"]["variant"] == "mqa"
    torch.testing.assert_close(run(attnzoo.from_pretrained(dst), inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


def test_pickled_bin_source_with_tied_embeddings(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model, inputs = TINY["llama"].make()
    src.mkdir()
    model.config.save_pretrained(src)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, src / "pytorch_model.bin")
    assert main(["convert", str(src), str(dst), "--to", "mqa", "--no-progress"]) == 0
    assert sorted(p.name for p in dst.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(dst.glob("*.bin"))
    assert "lm_head.weight" not in _state(dst)
    attnzoo.patch(model, "mqa")
    again = type(model).from_pretrained(dst).eval()
    torch.testing.assert_close(run(again, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)


def test_dtype_and_dry_run(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save("llama", src)
    assert main(["convert", str(src), str(dst), "--to", "gqa", "--groups", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "75.0% saved" in out and "KV heads 4 -> 1" in out
    assert "model.layers.*.self_attn.k_proj.weight      2  32x64" in out  # the plan
    _no_leftovers(dst)
    assert main(["convert", str(src), str(dst), "--to", "mqa", "--dtype", "bfloat16", "--no-progress"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in _state(dst).values())
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    gpt2 = tmp_path / "gpt2"
    _save("gpt2", gpt2)
    assert main(["convert", str(gpt2), str(tmp_path / "g"), "--to", "mqa", "--method", "svd", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    _no_leftovers(tmp_path / "g")


def test_force_replaces_and_refusals(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save("llama", src)
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert main(["convert", str(src), str(dst), "--to", "mqa", "--no-progress"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    assert main(["convert", str(src), str(dst), "--to", "mqa", "--force", "--no-progress"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    before = _hashes(src)
    assert main(["convert", str(src), str(src / "inner"), "--to", "mqa", "--no-progress"]) == 2
    assert "inside it" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path), "--to", "mqa", "--force", "--no-progress"]) == 2
    assert "contains SRC" in capsys.readouterr().err
    assert _hashes(src) == before


def _corrupt(src: Path, how: str):
    shards = sorted(src.glob("model-*.safetensors"))
    if how == "missing":
        shards[1].unlink()
        return shards[1].name
    if how == "garbage":
        shards[1].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
        return shards[1].name
    if how == "truncated":
        data = shards[-1].read_bytes()
        shards[-1].write_bytes(data[: len(data) - 100])
        return shards[-1].name
    raise AssertionError(how)


@pytest.mark.parametrize("args, how, msg", [
    (["--to", "gqa", "--groups", "3"], None, r"groups=3: must divide the 8 query heads"),
    (["--to", "gqa"], None, "needs groups"),
    (["--to", "nope"], None, r"unknown variant 'nope'.*converts to: (arrcoc, )?bigbird, gqa"),
    (["--to", "gqa", "--groups", "2", "--method", "magic"], None, r"method='magic'"),
    (["--to", "gqa", "--groups", "2", "--dtype", "int8"], None, r"dtype='int8'"),
    (["--to", "mqa"], "missing", r"shard listed in model.safetensors.index.json is missing"),
    (["--to", "mqa"], "garbage", "not a valid safetensors file"),
    (["--to", "mqa"], "truncated", "truncated"),
])
def test_bad_input_exits_2_names_the_problem_and_leaves_no_dst(args, how, msg, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save("llama", src, max_shard_size="30KB")
    name = _corrupt(src, how) if how else None
    before = _hashes(src)
    assert main(["convert", str(src), str(dst), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "attnzoo convert: error:" in err
    import re
    assert re.search(msg, err), err
    if name and how != "garbage":
        assert name in err
    _no_leftovers(dst)
    assert _hashes(src) == before


def test_cli_subprocess_exit_codes(tmp_path):
    src = tmp_path / "src"
    _save("gpt2", src)
    cmd = [sys.executable, "-m", "attnzoo", "convert", str(src), str(tmp_path / "dst"), "--to", "gqa", "--groups", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=False)
    assert res.returncode == 2 and "groups=3" in res.stderr and "Traceback" not in res.stderr
    _no_leftovers(tmp_path / "dst")


def test_info_tables(tmp_path, capsys):
    from transformers import LlamaConfig

    d = tmp_path / "l70"
    LlamaConfig(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192,
                intermediate_size=28672, dtype="float16").save_pretrained(d)
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split("  ")[0].strip(): ln for ln in out.splitlines()}
    assert "2.5 MiB" in lines["MHA (64 KV heads)"] and "20 GiB" in lines["MHA (64 KV heads)"]
    assert "320 KiB" in lines["GQA-8"] and "320 KiB" in lines["as is (GQA-8)"]
    assert "40 KiB" in lines["MQA (1 KV head)"]
    assert "100 KiB" in lines["MLA -68.75% (576 latent + 64 rope)"]  # the model's own shapes (2048 -> 640)
    assert "40 KiB" in lines["MLA -87.50% (192 latent + 64 rope)"]
    # a patched, non-native checkpoint: "as is" follows the record
    model, _ = TINY["gpt2"].make()
    attnzoo.patch(model, "mqa")
    model.save_pretrained(tmp_path / "g")
    assert main(["info", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    import re
    assert re.search(r"attnzoo patch +mqa", out) and re.search(r"as is \(patched\) +128 B", out)
    assert "K/V 1 x 8 in every layer" in out
    assert main(["info", str(tmp_path / "nope")]) == 2


def test_to_mha_expands_a_gqa_checkpoint_exactly(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model, inputs = _save("llama", src)  # 8 heads, 4 KV heads
    assert main(["convert", str(src), str(dst), "--to", "mha", "--no-progress"]) == 0
    assert "KV heads 4 -> 8" in capsys.readouterr().out
    again = type(model).from_pretrained(dst).eval()
    assert again.config.num_key_value_heads == 8
    torch.testing.assert_close(run(again, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
