"""Uptraining under `accelerate launch` with 2 processes on CPU (torchrun + gloo), with the example configs:
FSDP and DDP follow the one-process loss curve at equal global batch, a run stopped and resumed follows the
uninterrupted one, and the final checkpoint is a plain Hugging Face model."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnzoo.cli import main
from attnzoo.uptrain import UptrainOptions, uptrain

from tinylm import save_init, weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
STEPS, BATCH, SEQ = 4, 2, 32  # per process: 2 processes x 2 sequences = the one-process batch of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_init(root / "m")
    save_init(root / "t", seed=1)
    assert main(["data", "prepare", "builtin:0", "--tokens", "4000", "--seq-len", str(SEQ), "--out",
                 str(root / "d.tokens"), "--no-progress"]) == 0
    common = dict(model=str(root / "m"), teacher=str(root / "t"), data=str(root / "d.tokens"), alpha=0.5,
                  tokens=STEPS * 2 * BATCH * SEQ, seq_len=SEQ, lr=3e-3, loss_chunk=16, progress=False, cpu=True)
    one = uptrain(UptrainOptions(out=str(root / "one"), batch_size=2 * BATCH, **common))
    return root, one


def _launch(config: str, root: Path, out: str, *extra: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "examples" / config), "--mixed_precision", "no",
           "-m", "attnzoo", "uptrain", "--model", str(root / "m"), "--teacher", str(root / "t"), "--data",
           str(root / "d.tokens"), "--out", str(root / out), "--tokens", str(STEPS * 2 * BATCH * SEQ),
           "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", "3e-3", "--loss-chunk", "16",
           "--checkpoint-every", "2", "--no-progress", "--cpu", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _same_run(root: Path, out: str, one) -> None:
    from transformers import AutoModelForCausalLM

    log = [json.loads(line) for line in (root / out / "loss_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kl"):
        assert [e[key] for e in log] == pytest.approx([e[key] for e in one.log], rel=1e-5, abs=1e-6)
    a, b = weights(root / out), weights(root / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(str(root / out))  # plain transformers, no attnzoo
    assert type(model).__name__ == "LlamaForCausalLM" and not (root / (out + ".partial")).exists()


@pytest.mark.parametrize("config,placement", [("accelerate_fsdp.yaml", "shard"), ("accelerate_ddp.yaml", "replicate")])
def test_stopped_and_resumed_run_on_two_processes_matches_one_process(setup, config, placement):
    root, one = setup
    out = config.split("_")[1].split(".")[0]
    text = _launch(config, root, out, "--teacher-placement", placement, "--stop-after", "2")
    kind = "fsdp" if "fsdp" in config else "multi_cpu"
    assert f"on 2 process(es) ({kind}, gloo)" in text and "not saved (stopped early" in text
    ckpt = root / (out + ".partial") / "checkpoints" / "step_000002"
    assert (ckpt / "model_rank1.safetensors").is_file() == (kind == "fsdp")  # FSDP: one shard per process
    text = _launch(config, root, out, "--teacher-placement", placement, "--resume")
    assert "resuming at step 2" in text
    _same_run(root, out, one)
