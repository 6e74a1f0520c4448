"""``attnzoo uptrain --context-parallel 2``: two gloo processes sharing each sequence train as one process does."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnzoo.uptrain import UptrainOptions, uptrain

from tinylm import save_init, weights

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (path / "loss_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two `accelerate launch` processes start (~30 s of CPU on the 2-core machine)
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_context_parallel_uptrain_matches_one_process(tmp_path):
    init = save_init(tmp_path / "init")
    args = [
        "--model",
        str(init),
        "--tokens",
        str(3 * 2 * 30),
        "--batch-size",
        "2",
        "--seq-len",
        "30",
        "--lr",
        "3e-3",
        "--no-progress",
        "--cpu",
    ]
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "attnzoo",
        "uptrain",
        "--out",
        str(tmp_path / "cp"),
        "--context-parallel",
        "2",
        *args,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "on 2 process(es) (multi_cpu, gloo, context parallel 2)" in p.stdout
    single = uptrain(
        UptrainOptions(
            model=str(init),
            out=str(tmp_path / "one"),
            tokens=3 * 2 * 30,
            batch_size=2,
            seq_len=30,
            lr=3e-3,
            progress=False,
            cpu=True,
        )
    )
    assert single.steps == 3
    cp_losses, one_losses = _losses(tmp_path / "cp"), _losses(tmp_path / "one")
    assert len(cp_losses) == 3
    torch.testing.assert_close(torch.tensor(cp_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-5)
    a, b = weights(tmp_path / "cp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_context_parallel_option_errors(tmp_path):
    with pytest.raises(ValueError, match="--context-parallel=0: expected an integer >= 1"):
        UptrainOptions(model="builtin", out=str(tmp_path / "o"), tokens=64, context_parallel=0).validate()
    with pytest.raises(ValueError, match="--context-parallel=2 with --teacher"):
        UptrainOptions(
            model="builtin", out=str(tmp_path / "o"), tokens=64, context_parallel=2, teacher="builtin"
        ).validate()
    with pytest.raises(
        ValueError,
        match=r"--context-parallel=2: the launch has 1 process\(es\); expected a divisor of 1.*--num_processes 2",
    ):
        uptrain(
            UptrainOptions(
                model="builtin",
                out=str(tmp_path / "o"),
                tokens=64,
                seq_len=16,
                batch_size=1,
                context_parallel=2,
                progress=False,
                cpu=True,
            )
        )
