"""Small CLI promises: convert takes 'builtin', a KV cache that grows never reads as a negative saving,
`list --json` is structured, `--no-progress` silences transformers' bars too."""
import json


from attnzoo.cli import main
from attnzoo.conversion.card import kv_change


def test_kv_change_wording():
    assert kv_change(4, 2) == "50.0% saved"
    assert kv_change(4, 4) == kv_change(0, 4) == "no change"
    assert kv_change(1, 4) == "4.0x larger, +300.0%"


def test_convert_builtin_and_back_to_mha(tmp_path, capsys):
    from attnzoo.data import builtin_model_dir

    mqa, back = tmp_path / "mqa", tmp_path / "back"
    assert main(["convert", "builtin", str(mqa), "--to", "mqa", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(builtin_model_dir()) in out and "75.0% saved" in out
    assert json.loads((mqa / "config.json").read_text())["num_key_value_heads"] == 1
    assert main(["convert", str(mqa), str(back), "--to", "mha", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4.0x larger, +300.0%" in out and "-300" not in out and "before: 1 KV head " in out
    card = (back / "README.md").read_text()
    assert "KV cache: 4.0x larger, +300.0%." in card and "-300" not in card
