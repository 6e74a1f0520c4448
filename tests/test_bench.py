"""``attnzoo bench``: every group runs end to end at tiny shapes (CPU smoke) and writes its JSON and markdown with
device, commit and date; the peers' rows reach the groups that compare with them; bad names get one line."""
import json
import textwrap

import pytest
import torch

from attnzoo import bench
from attnzoo.bench.record import Row, device_tag
from attnzoo.cli import main

# A stand-in for the shared peers_bench.py (not part of the repo): same arguments, same output file.
FAKE_PEERS = textwrap.dedent("""
    import argparse, json, os
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    rows = [dict(group="dense", name="sdpa-math:B1H4D64", n=256, mode="fwd", ms=1.0, tflops=0.1),
            dict(group="ceiling", name="d2d_copy_1GiB", n=0, mode="fwd", ms=0.5, GBps=4216.8),
            dict(group="longformer", name="hf-LongformerSelfAttention", n=384, mode="fwd", ms=1000.0),
            dict(group="reformer", name="hf-LSHSelfAttention", n=512, mode="fwd", ms=2.0)]
    with open(os.path.join(os.environ["OUT"], "peers.jsonl"), "w") as f:
        for r in rows:
            if not only or r["group"] in only:
                f.write(json.dumps(r) + "\\n")
""")


def _needs_cuda(name):
    reason = getattr(bench.load_group(name), "NEEDS_CUDA", "")
    if reason and not torch.cuda.is_available():
        pytest.skip(f"group {name!r} needs CUDA: {reason}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every group once, smoke shapes, with the fake peers: {group: (json dict, markdown, rows returned)}."""
    out = tmp_path_factory.mktemp("bench")
    peers = out / "peers_bench.py"
    peers.write_text(FAKE_PEERS)
    runnable = [g for g in bench.GROUPS
                if not getattr(bench.load_group(g), "NEEDS_CUDA", "") or torch.cuda.is_available()]
    rows = bench.run(runnable, smoke=True, peers=str(peers), out_dir=str(out / "results"), tag="smoke")
    got = {}
    for g in runnable:
        data = json.loads((out / "results" / f"{g}-smoke.json").read_text())
        got[g] = (data, (out / "results" / f"{g}-smoke.md").read_text(), rows)
    return got


def test_groups_follow_the_protocol():
    for name in bench.GROUPS:
        mod = bench.load_group(name)
        assert isinstance(mod.TITLE, str) and mod.TITLE and "\n" not in mod.TITLE
        assert mod.SECTIONS and all(isinstance(d, str) for d in mod.SECTIONS.values())
        assert isinstance(mod.PEERS, tuple)
        assert callable(mod.run)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(bench.GROUPS))
def test_group_smoke_writes_json_and_markdown(results, group):
    _needs_cuda(group)
    data, md, _ = results[group]
    env = data["environment"]
    assert data["group"] == group and env["device"] and env["commit"] and env["date"]
    assert data["rows"], "no rows"
    ours = [r for r in data["rows"] if r["name"].startswith("attnzoo")]
    assert ours and all(r["ms"] > 0 for r in ours if r["ms"] == r["ms"]), ours
    assert not [r for r in ours if r.get("error")], [r for r in ours if r.get("error")]
    assert {r["mode"] for r in ours} >= {"fwd", "fwd+bwd"}
    assert md.startswith(f"# attnzoo bench: {group}")
    assert f"commit: {env['commit']}" in md and f"date: {env['date']}" in md
    for section in {r["group"] for r in data["rows"]}:
        assert f"## {section}" in md
    # the peers' rows land in the groups that compare with them, and only there
    mod = bench.load_group(group)
    assert {p["group"] for p in data["peers"]} == {"peer:" + g for g in mod.PEERS} & {
        "peer:dense", "peer:ceiling", "peer:longformer", "peer:reformer"}
    assert ("## peers" in md) == bool(data["peers"])


@pytest.mark.slow
def test_sparse_smoke_rows_and_summary(results):
    data, md, _ = results["sparse"]
    rows = data["rows"]
    names = {r["name"] for r in rows}
    assert {"attnzoo sliding_window op (+qkv)", "attnzoo bigbird op (+qkv)", "flex plain mask_mod (+qkv)",
            "dense SDPA math (+qkv)", "attnzoo longformer op, 1 global token (+qkv)", "qkv projection alone",
            "attnzoo sliding_window module (q/k/v/o proj)"} <= names
    given = [r for r in rows if r["name"] == "attnzoo sliding_window op, kernels, dO given"]
    assert [r["mode"] for r in given] == ["fwd+bwd"] and given[0]["ms"] > 0  # backward given dO, no forward row
    op = next(r for r in rows if r["name"] == "attnzoo sliding_window op (+qkv)")
    assert 0 < op["kept"] < 1 and op["tiles_visited"] > 0 and op["backend"]
    errors = [r for r in rows if r.get("error")]  # only FlexAttention's CPU backward may fail (none off CUDA)
    assert all(r["name"].startswith("flex") and r["mode"] == "fwd+bwd" for r in errors), errors
    assert "## against dense and the ideal" in md and "## targets" in md
    assert "faster than HF Longformer" in md  # the fake peer's row (n=384, fwd) was checked
    assert {r["group"] for r in rows} == {"sliding", "bigbird", "scaling"}


@pytest.mark.slow
def test_dense_smoke_ratios(results):
    data, md, _ = results["dense"]
    mod_rows = [r for r in data["rows"] if r["group"] == "module" and r["name"].startswith("attnzoo")]
    assert mod_rows and all(r["vs_best"] > 0 for r in mod_rows)  # against the hand-written module
    assert "## attnzoo against the fastest competitor" in md
    assert any(p["name"] == "d2d_copy_1GiB" and p["gbps"] == 4216.8 for p in data["peers"])


@pytest.mark.slow
def test_report_rebuilds_markdown(results, tmp_path):
    data, md, _ = results["sparse"]
    path = tmp_path / "sparse-smoke.json"
    path.write_text(json.dumps(data))
    out = bench.report(str(path))
    assert open(out).read().split("\n", 6)[6] == md.split("\n", 6)[6]  # same tables from the JSON alone


def test_cli_runs_one_section_and_ends_with_a_table(tmp_path, capsys):
    assert main(["bench", "--variants", "dense", "--sections", "module", "--smoke", "--out", str(tmp_path),
                 "--tag", "t"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-8:] and all(line.startswith("module ") for line in out[-8:]), out[-12:]  # ends with the table
    assert out[-9].startswith("-----") and out[-10].split()[:4] == ["group", "name", "n", "mode"]
    assert any(line.startswith("wrote ") and "dense-t.json" in line for line in out)
    data = json.loads((tmp_path / "dense-t.json").read_text())
    assert {r["group"] for r in data["rows"]} == {"module"} and data["options"]["sections"] == ["module"]


def test_profile_says_where_each_steps_time_goes(tmp_path):
    """--profile: every row carries its largest profiled entries (CPU operators here), shares summing to 100%,
    the SDPA call among the dense module's, and the markdown lists them per row."""
    assert main(["bench", "--variants", "dense", "--sections", "module", "--smoke", "--profile", "--out",
                 str(tmp_path), "--tag", "t"]) == 0
    data = json.loads((tmp_path / "dense-t.json").read_text())
    assert data["rows"]
    for r in data["rows"]:
        entries = r["profile"]
        assert 0 < len(entries) <= 9 and all(e["ms"] >= 0 and e["calls"] > 0 for e in entries)
        assert abs(sum(e["share"] for e in entries) - 100) < 1
        assert [e["ms"] for e in entries[:-1]] == sorted((e["ms"] for e in entries[:-1]), reverse=True)
    assert any("scaled_dot_product" in e["name"] for r in data["rows"] for e in r["profile"])
    md = (tmp_path / "dense-t.md").read_text()
    assert md.count("\n### module: ") == len(data["rows"]) and "## where the time goes" in md
    assert main(["bench", "--report", str(tmp_path / "dense-t.json")]) == 0  # rebuilt from the JSON alone
    assert (tmp_path / "dense-t.md").read_text() == md


def test_profile_names_are_short():
    from attnzoo.bench.profile import _short

    gemm = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
    assert _short(gemm + "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)") == gemm
    ew = "void at::native::(anonymous namespace)::elementwise_kernel<128, 2>"
    assert _short(ew + "(int, at::native::(anonymous namespace)::F)") == ew
    assert _short("_fwd_kernel") == "_fwd_kernel" and len(_short("x" * 200)) == 100


def test_merge_keeps_the_sections_not_run_now(tmp_path):
    out = str(tmp_path)
    assert main(["bench", "--variants", "dense", "--sections", "module", "--smoke", "--out", out, "--tag", "t"]) == 0
    assert main(["bench", "--variants", "dense", "--sections", "dense-op", "--smoke", "--out", out, "--tag", "t",
                 "--merge"]) == 0
    data = json.loads((tmp_path / "dense-t.json").read_text())
    assert [r["group"] for r in data["rows"]] == sorted((r["group"] for r in data["rows"]),
                                                        key=["dense-op", "module"].index)  # in SECTIONS order
    assert {r["group"] for r in data["rows"]} == {"dense-op", "module"}
    assert data["environment"]["merged"].startswith("module from commit ")
    assert "merged: module from commit" in (tmp_path / "dense-t.md").read_text()


def test_merge_keeps_each_sections_own_commit_across_merges(tmp_path, monkeypatch):
    """A section kept through two merges still names the commit it was measured at (not the last file's)."""
    out = str(tmp_path)
    common = ["bench", "--variants", "dense", "--smoke", "--out", out, "--tag", "t"]
    for commit, section in (("aaaa111", "module"), ("bbbb222", "dense-op"), ("cccc333", "dense-op")):
        monkeypatch.setenv("ATTNZOO_COMMIT", commit)
        assert main([*common, "--sections", section] + (["--merge"] if commit != "aaaa111" else [])) == 0
    env = json.loads((tmp_path / "dense-t.json").read_text())["environment"]
    assert env["commit"] == "cccc333" and env["merged"].startswith("module from commit aaaa111, "), env
    from attnzoo.bench import _merged_origins
    assert _merged_origins("a, b from commit X, d1; c from commit Y, d2") == {
        "a": "commit X, d1", "b": "commit X, d1", "c": "commit Y, d2"}


@pytest.mark.parametrize("argv, needle", [
    (["--variants", "dense,sparce"], "--variants='sparce': expected one of 'dense', 'sparse'"),
    (["--variants", "dense", "--sections", "slidng"], "--sections='slidng'"),
])
def test_bad_names_get_one_line(argv, needle, capsys, tmp_path):
    assert main(["bench", *argv, "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_missing_peers_script_is_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "--variants", "dense", "--sections", "module", "--smoke", "--peers",
                 str(tmp_path / "nope.py"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_lists_groups_and_sections(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for name in bench.GROUPS:
        mod = bench.load_group(name)
        assert f"  {name}: {mod.TITLE}" in out
        assert all(f"      {s}: " in out for s in mod.SECTIONS)


def test_device_tag_and_rows_roundtrip():
    assert device_tag("NVIDIA H200") == "h200"
    assert device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert device_tag("NVIDIA GeForce RTX 4090") == "4090"
    r = Row("sliding", "x", 8, "fwd", 1.5, gpu_ms=1.2, extra={"kept": 0.5})
    assert Row.from_dict(json.loads(json.dumps(r.as_dict()))) == r
