"""The real-model quality benchmark's scripts (benchmarks/quality/), end to end on the built-in model: one row per
family through run.py's training-free path and uptrain_rows.py's convert -> (transfer) -> distill -> evaluate
pipeline, its results file, resume and deadline."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(QUALITY))
    try:
        yield importlib.import_module("rows"), importlib.import_module("run"), importlib.import_module("uptrain_rows")
    finally:
        sys.path.remove(str(QUALITY))


TINY = ["--model", "builtin", "--eval-data", "builtin:1", "--calib", "builtin:0", "--eval-sequences", "1",
        "--calib-sequences", "1", "--decode-tokens", "2", "--device", "cpu"]
UPTRAIN = ["--train", "builtin:0", "--compile", "off", "--tokens", "128", "--transfer-tokens", "64", "--seq-len", "32",
           "--batch-size", "2", "--log-every", "1"]
ONE_PER_FAMILY = "mqa-pca,sw127,mla68-pca,hedgehog-w64,reformer"


def test_rows_use_the_variants_defaults(scripts):
    import attnzoo
    from attnzoo.checkpoint_io import load_causal_lm

    rows, _, _ = scripts
    table = rows.training_free_rows(load_causal_lm("builtin").config)
    reformer = attnzoo.Reformer()
    assert table["reformer"].config == reformer
    assert table["sw-reformer"].config.window == reformer.num_hashes * reformer.bucket_size
    assert table["performer"].config == attnzoo.Performer()
    assert {r.config.method for k, r in table.items() if k.startswith("mla")} == set(rows.MLA_METHODS)
    assert all(r.calibrated for k, r in table.items() if k.startswith("mla"))
    with pytest.raises(SystemExit, match="unknown row 'nope'"):
        rows.select(table, "mqa-pca,nope")
    assert [r.key for r in rows.select(table, "MQA svd,sw127")] == ["mqa-svd", "sw127"]


def test_run_training_free_rows(scripts, tmp_path):
    _, run, _ = scripts
    out = tmp_path / "free.md"
    assert run.main(TINY + ["--rows", "original," + ONE_PER_FAMILY + ",performer", "--out", str(out),
                            "--uptrained-json", str(tmp_path / "none.json")]) == 0
    got = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert len(got) == 7 and all(r["perplexity"] > 1 for r in got.values())
    assert got["original (MHA)"]["KV B/token"] > got["MQA pca (calibrated)"]["KV B/token"]
    assert out.with_suffix(".png").is_file() and "| MQA pca (calibrated) |" in out.read_text()
    # a deadline already past: nothing new is started, the file keeps what it had
    assert run.main(TINY + ["--rows", "mqa-mean", "--deadline", "0", "--out", str(out)]) == 0
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 7


def test_uptrain_rows_pipeline(scripts, tmp_path):
    _, _, up = scripts
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    args = TINY + UPTRAIN + ["--out", str(out), "--scratch", str(scratch)]
    assert up.main(args + ["--rows", ONE_PER_FAMILY]) == 0
    results = out / f"{up.NAME}.json"
    got = json.loads(results.read_text())["rows"]
    assert [r["model"].split(" ")[0] for r in got] == ["original", "MQA", "sliding", "MLA", "linear", "reformer"]
    for r in got[1:]:
        assert "error" not in r, r
        assert r["perplexity"] > 1 and r["training-free"] > 1
        assert r["tokens"] == (128 + 64 if r["model"].startswith("linear") else 128)
    assert got[4]["transfer only"] > 1  # the linear row: transfer, then LoRA + distillation
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{up.NAME}.json", f"{up.NAME}.md", f"{up.NAME}.png", "uptrain_rows.log"])
    assert not any(scratch.iterdir())  # every row's models are deleted
    assert "attnzoo uptrain --model" in (out / "uptrain_rows.log").read_text()
    # --report rebuilds the same markdown from the results file alone, stamped with the run that measured the rows
    md = out / f"{up.NAME}.md"
    written = md.read_text()
    assert "`python benchmarks/quality/uptrain_rows.py " + " ".join(args + ["--rows", ONE_PER_FAMILY]) in written
    md.unlink()
    assert up.main(["--report", str(results), "--model", "builtin"]) == 0
    assert md.read_text() == written
    # resume: the rows are in the file, nothing is trained again; a new row that cannot fit the deadline is skipped
    before = results.read_text()
    assert up.main(args + ["--rows", ONE_PER_FAMILY + ",sw-reformer", "--deadline", "1",
                           "--assume-tokens-per-s", "1"]) == 0
    assert json.loads(results.read_text())["rows"] == json.loads(before)["rows"]
    # --previous seeds a fresh output folder
    fresh = tmp_path / "fresh"
    assert up.main(TINY + UPTRAIN + ["--out", str(fresh), "--scratch", str(scratch), "--rows", "mqa-pca",
                                     "--previous", str(results)]) == 0
    assert json.loads((fresh / f"{up.NAME}.json").read_text())["rows"] == json.loads(before)["rows"]


def test_failed_row_is_recorded_and_skipped(scripts, tmp_path, monkeypatch):
    _, _, up = scripts
    out = tmp_path / "out"
    args = TINY + UPTRAIN + ["--out", str(out), "--scratch", str(tmp_path / "s"), "--rows", "sw127"]

    def boom(self, opts, clock):
        raise RuntimeError("no GPU today")

    monkeypatch.setattr(up.Runner, "_uptrain", boom)
    assert up.main(args) == 0
    row = json.loads((out / f"{up.NAME}.json").read_text())["rows"][-1]
    assert row["error"] == "RuntimeError: no GPU today"
    assert "no GPU today" in (out / f"{up.NAME}.md").read_text()
    monkeypatch.undo()
    assert up.main(args) == 0  # skipped: still the error
    assert json.loads((out / f"{up.NAME}.json").read_text())["rows"][-1]["error"]
    assert up.main(args + ["--retry-failed"]) == 0
    assert "error" not in json.loads((out / f"{up.NAME}.json").read_text())["rows"][-1]


def test_deadline_estimate(scripts):
    _, _, up = scripts
    clock = up.Clock(100.0, tokens_per_s=1000.0, overhead=10.0)
    assert clock.estimate(1000) == pytest.approx(1.1 * (10 + 1))
    clock.trained(5000, 1.0)
    clock.overheads.append(2.0)
    assert clock.estimate(10_000) == pytest.approx(1.1 * (2 + 2))
    assert 99 < clock.left() <= 100
