"""Small CLI promises: convert takes 'builtin', a KV cache that grows never reads as a negative saving,
`list --json` is structured, `--no-progress` silences transformers' bars too."""
import json

import pytest


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
    assert "4.0x larger, +300.0%" in out and "-300" not in out and "before: K/V 1 x 48 " in out
    card = (back / "README.md").read_text()
    assert "Per token: 4.0x larger, +300.0%." in card and "-300" not in card


def _hf_bars_on() -> bool:
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_silences_transformers_bars_for_the_run_only(quiet, tmp_path, capsys):
    from hf_tiny import TINY

    model, _ = TINY["gpt2"].make()  # in-memory conversion: transformers loads and saves (its own bars)
    model.save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert _hf_bars_on()
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "gqa", "--groups", "2"]
              + ["--no-progress"] * quiet)
    err = capsys.readouterr().err
    assert rc == 0 and _hf_bars_on()  # restored after the run
    assert ("Writing model shards" in err) is not quiet


def test_uptrain_prints_final_ce_and_objective_labelled(tmp_path, capsys):
    from tinylm import pretrained_tiny

    tiny = pretrained_tiny(tmp_path / "tiny", steps=4)
    capsys.readouterr()
    rc = main(["uptrain", "--model", str(tiny), "--teacher", str(tiny), "--alpha", "0.5", "--out", str(tmp_path / "o"),
               "--tokens", "256", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--cpu"])
    captured = capsys.readouterr()
    assert rc == 0 and "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    log = [json.loads(line) for line in (tmp_path / "o" / "loss_log.jsonl").read_text().splitlines()]
    ce, obj = (sum(e[k] for e in log[-10:]) / len(log[-10:]) for k in ("ce", "loss"))
    assert abs(ce - obj) > 1e-4  # distillation: the two differ, and both are shown, labelled
    rows = {line.split("  ")[0]: line.split()[-1] for line in captured.out.splitlines() if line.startswith("final ")}
    assert rows == {"final cross-entropy (mean of last 10 steps, as plotted)": f"{ce:.4f}",
                    "final training objective (alpha*KL + (1-alpha)*CE)": f"{obj:.4f}"}
    rec = json.loads((tmp_path / "o" / "config.json").read_text())["attnzoo"]["uptrain"][-1]
    assert rec["final_ce"] == pytest.approx(ce, abs=1e-5) and rec["final_loss"] == pytest.approx(obj, abs=1e-5)


def test_list_json_is_structured(capsys):
    from attnzoo import create, list_variants

    assert main(["list", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in items] == list_variants()
    for item in items:
        assert set(item) == {"name", "description", "options", "patch_options", "example",
                             "kv_bytes_per_token_example", "kv_dtype_example"}
        assert isinstance(item["example"], dict) and isinstance(item["kv_bytes_per_token_example"], int)
        opts = {o["name"]: o for o in item["options"]}
        assert {"dim", "heads", "causal"} <= set(opts)  # groups, rope: the dense and sparse families
        assert opts["dim"]["required"] and opts["dim"]["type"] == "int" and "width" in opts["dim"]["doc"]
        assert opts["causal"] == {"name": "causal", "type": "bool", "default": False, "required": False,
                                  "doc": "causal self-attention"}
        for o in item["options"]:
            assert isinstance(o["type"], str) and o["doc"], (item["name"], o)  # every option documented
        create(item["name"], **item["example"])  # the example round-trips through JSON
        if item["patch_options"] is not None:
            assert all(o["doc"] for o in item["patch_options"])
    longformer = next(i for i in items if i["name"] == "longformer")
    assert longformer["example"]["global_tokens"] == [0, 3]
