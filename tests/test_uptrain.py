"""attnzoo uptrain: it trains, resumes exactly, distils, does LoRA, records its budget, rejects bad input."""
import json

import pytest
import torch

from attnzoo.cli import main
from attnzoo.uptrain import UptrainOptions, uptrain

from tinylm import pretrained_tiny, save_init, weights

SMALL = dict(batch_size=2, seq_len=32, lr=3e-3, progress=False, cpu=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return pretrained_tiny(tmp_path_factory.mktemp("tiny"), steps=10)


def test_pretrain_reduces_loss_and_records_tokens(tmp_path):
    init = save_init(tmp_path / "init")
    r = uptrain(UptrainOptions(model=str(init), out=str(tmp_path / "out"), tokens=40 * 4 * 32, stage="pretrain",
                               **{**SMALL, "batch_size": 4}))
    first = sum(e["loss"] for e in r.log[:5]) / 5
    last = sum(e["loss"] for e in r.log[-5:]) / 5
    assert r.steps == 40 and last < first - 0.3
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["attnzoo"]["pretraining_tokens"] == 40 * 4 * 32
    for f in ("model.safetensors", "tokenizer.json", "loss_log.jsonl", "loss_curve.png"):
        assert (tmp_path / "out" / f).is_file()
    assert not (tmp_path / "out.partial").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # plain HF loads it


def test_fraction_budget_is_recorded(tiny, tmp_path):
    r = uptrain(UptrainOptions(model=str(tiny), out=str(tmp_path / "u"), fraction=0.5, **SMALL))
    pre = 10 * 4 * 64
    assert r.tokens <= 0.5 * pre and r.tokens > 0.5 * pre - 2 * 32
    rec = json.loads((tmp_path / "u" / "config.json").read_text())["attnzoo"]
    assert rec["pretraining_tokens"] == pre  # unchanged by uptraining
    assert rec["uptrain"][-1]["tokens"] == r.tokens
    assert rec["uptrain"][-1]["fraction_of_pretraining"] == pytest.approx(r.tokens / pre, rel=1e-5)


def test_resume_after_interruption_matches_uninterrupted_run(tiny, tmp_path):
    common = dict(model=str(tiny), tokens=6 * 2 * 32, teacher=str(tiny), alpha=0.3, temperature=2.0, **SMALL)
    uptrain(UptrainOptions(out=str(tmp_path / "full"), **common))
    part = uptrain(UptrainOptions(out=str(tmp_path / "cut"), checkpoint_every=2, stop_after=3, **common))
    assert part.stopped and part.out is None and not (tmp_path / "cut").exists()
    assert (tmp_path / "cut.partial" / "checkpoints" / "step_000002").is_dir()
    with pytest.raises(FileExistsError, match="--resume to continue it or --force"):
        uptrain(UptrainOptions(out=str(tmp_path / "cut"), **common))
    with pytest.raises(ValueError, match="--lr=0.001 differs"):
        uptrain(UptrainOptions(out=str(tmp_path / "cut"), resume="latest", **{**common, "lr": 1e-3}))
    done = uptrain(UptrainOptions(out=str(tmp_path / "cut"), resume="latest", checkpoint_every=2, **common))
    assert done.steps == 6 and [e["step"] for e in done.log] == list(range(1, 7))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log = [e["loss"] for e in json.loads("[" + ",".join((tmp_path / "full" / "loss_log.jsonl").read_text()
                                                               .split("\n")[:-1]) + "]")]
    assert [e["loss"] for e in done.log] == full_log


def test_distillation_from_itself_starts_at_zero_kl(tiny, tmp_path):
    r = uptrain(UptrainOptions(model=str(tiny), out=str(tmp_path / "d"), tokens=2 * 2 * 32, teacher=str(tiny),
                               alpha=1.0, **{**SMALL, "lr": 1e-9}))
    assert r.log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and r.log[0]["ce"] > 1.0


def test_lora_trains_new_modules_fully_and_saves_plain_hf(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from attnzoo.checkpoint_io import update_metadata
    from attnzoo.demo.pipeline import convert_gqa

    src = AutoModelForCausalLM.from_pretrained(str(tiny))
    conv = convert_gqa(src, 2, "mean")  # records new_modules = k_proj, v_proj
    conv.save_pretrained(str(tmp_path / "conv"))
    r = uptrain(UptrainOptions(model=str(tmp_path / "conv"), out=str(tmp_path / "l"), tokens=3 * 2 * 32,
                               lora_rank=2, **SMALL))
    text = r.trainable.describe()
    assert "LoRA on down_proj, gate_proj, o_proj, q_proj, up_proj" in text and "trained fully: k_proj, v_proj" in text
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "l"))
    before, after = weights(tmp_path / "conv"), weights(tmp_path / "l")
    assert set(after) == set(before)  # merged: no adapter tensors left
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[k], after[k])  # LoRA delta merged in
    assert out.config.num_key_value_heads == 2
    assert json.loads((tmp_path / "l" / "config.json").read_text())["attnzoo"]["uptrain"][-1]["lora"]["rank"] == 2
    del update_metadata


def _other_vocab_teacher(tmp_path):
    return save_init(tmp_path / "t", vocab_size=600)


@pytest.mark.parametrize("change, error, message", [
    (dict(tokens=0), ValueError, "--tokens=0: expected an integer >= 1"),
    (dict(tokens=None), ValueError, "exactly one of --tokens N or --fraction F"),
    (dict(tokens=10), ValueError, "--tokens=10 is less than one optimizer step of 64 tokens"),
    (dict(model="/no/such"), FileNotFoundError, "--model='/no/such': no such directory"),
    (dict(data="{tmp}/empty.ids"), ValueError, "holds 0 token"),
    (dict(teacher="OTHER"), ValueError, "--teacher=.*its vocabulary has 600 tokens but the student's"),
    (dict(lr=-1.0), ValueError, r"--lr=-1.0: expected a number in \(0.0, inf\]"),
    (dict(mixed_precision="fp8"), ValueError, "--mixed-precision='fp8': expected one of 'no', 'fp16', 'bf16'"),
    (dict(lora_rank=2, lora_targets=("qproj",)), ValueError, "--lora-targets: 'qproj' matches no module"),
    (dict(resume="latest"), FileNotFoundError, "--resume: no checkpoint in"),
])
def test_bad_input_names_the_option(tiny, tmp_path, change, error, message):
    (tmp_path / "empty.ids").write_text("")
    opts = dict(model=str(tiny), out=str(tmp_path / "o"), tokens=256, **SMALL)
    opts.update(change)
    if opts.get("teacher") == "OTHER":
        opts["teacher"] = str(_other_vocab_teacher(tmp_path))
    if "data" in opts:
        opts["data"] = opts["data"].format(tmp=tmp_path)
    with pytest.raises(error, match=message):
        uptrain(UptrainOptions(**opts))
    assert not (tmp_path / "o").exists()


def test_fraction_needs_recorded_pretraining(tmp_path, capsys):
    init = save_init(tmp_path / "init")
    cfg = json.loads((init / "config.json").read_text())
    del cfg["attnzoo"]
    (init / "config.json").write_text(json.dumps(cfg))
    rc = main(["uptrain", "--model", str(init), "--out", str(tmp_path / "o"), "--fraction", "0.05"])
    assert rc == 2
    assert "--fraction=0.05: the model does not record its pretraining tokens" in capsys.readouterr().err


def test_cli_runs_and_prints_table(tiny, tmp_path, capsys):
    rc = main(["uptrain", "--model", str(tiny), "--out", str(tmp_path / "o"), "--tokens", "128", "--batch-size", "2",
               "--seq-len", "32", "--no-progress", "--cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "uptrain summary" in out and "all weights train fully" in out
    assert main(["uptrain", "--model", str(tiny), "--out", str(tmp_path / "o"), "--tokens", "128"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
