"""Two processes through `accelerate launch` on CPU (torchrun + gloo): DDP gives the one-process result."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.uptrain import UptrainOptions, uptrain

from tinylm import pretrained_tiny, weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def test_two_process_uptrain_matches_one_process(tmp_path):
    tiny = pretrained_tiny(tmp_path, steps=4)
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnzoo", "uptrain", "--model", str(tiny),
           "--out", str(tmp_path / "ddp"), "--tokens", str(4 * 4 * 32), "--batch-size", "2", "--seq-len", "32",
           "--lr", "3e-3", "--no-progress", "--cpu"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "on 2 process(es) (multi_cpu, gloo)" in p.stdout and "uptrain summary" in p.stdout
    single = uptrain(UptrainOptions(model=str(tiny), out=str(tmp_path / "one"), tokens=4 * 4 * 32, batch_size=4,
                                    seq_len=32, lr=3e-3, progress=False, cpu=True))
    assert single.steps == 4
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_multi_gpu_example_script_runs_on_cpu(tmp_path):
    env = dict(_env(), OUT=str(tmp_path / "run"), PRESET="tiny", ACCEL_ARGS="--multi_gpu --dynamo_backend no",
               PRETRAIN_TOKENS="8192", FRACTION="0.25", BATCH="2", SEQ="64", EVAL_SEQS="2")
    p = subprocess.run(["bash", str(REPO / "examples" / "multi_gpu_uptrain.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    log = (tmp_path / "run" / "multi_gpu_uptrain.log")
    assert p.returncode == 0, (log.read_text()[-4000:] if log.exists() else p.stderr[-4000:])
    text = log.read_text()
    assert text.count("on 2 process(es) (multi_cpu, gloo)") == 3 and "done; log:" in text
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "gqa2-mean + distill" in summary and sys.executable
