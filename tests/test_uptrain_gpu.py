"""Uptraining on a CUDA GPU: the chunked loss in bf16 and compiled, and a bf16 + compile + distillation run."""
import json

import pytest
import torch

from attnzoo.uptrain import UptrainOptions, uptrain
from attnzoo.uptrain.losses import _chunk_grads, chunked_head_loss, mixed_loss

from tinylm import save_init

pytestmark = pytest.mark.gpu


def test_chunked_loss_under_bf16_autocast_is_close_to_float32_full_logits():
    torch.manual_seed(0)
    b, t, h, v = 4, 257, 64, 5000
    hidden = torch.randn(b, t, h, device="cuda", requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False, device="cuda")
    t_hidden, t_head = torch.randn(b, t, h, device="cuda"), torch.nn.Linear(h, v, bias=False, device="cuda")
    ids = torch.randint(0, v, (b, t), device="cuda")
    ref, _ = mixed_loss(head(hidden), ids, t_head(t_hidden), 0.5, 1.0)
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = chunked_head_loss(hidden, head, ids, t_hidden, t_head, 0.5, 1.0, chunk=300)
    g = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for a, r in zip(g, g_ref):
        assert a.dtype == r.dtype and (a - r).norm() / r.norm() < 3e-2


@pytest.mark.parametrize("teacher,temperature", [(False, 1.0), (True, 1.0), (True, 2.0)])
def test_compiled_chunk_step_equals_eager(teacher, temperature):
    torch.manual_seed(0)
    h, w = torch.randn(512, 64, device="cuda"), torch.randn(3000, 64, device="cuda")
    th, tw = (torch.randn(512, 64, device="cuda"), torch.randn(3000, 64, device="cuda")) if teacher else (None, None)
    tgt = torch.randint(0, 3000, (512,), device="cuda")
    eager = _chunk_grads(h, w, None, tgt, th, tw, None, 0.4, temperature, 1 / 512)
    compiled = torch.compile(_chunk_grads, dynamic=False)(h, w, None, tgt, th, tw, None, 0.4, temperature, 1 / 512)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compiled_distillation_run_on_cuda(tmp_path):
    model, teacher = save_init(tmp_path / "m"), save_init(tmp_path / "t", seed=1)
    common = dict(model=str(model), teacher=str(teacher), tokens=6 * 4 * 64, batch_size=4, seq_len=64, lr=3e-3,
                  progress=False, mixed_precision="bf16")
    fast = uptrain(UptrainOptions(out=str(tmp_path / "fast"), compile=True, **common))
    plain = uptrain(UptrainOptions(out=str(tmp_path / "plain"), loss_chunk=0, **common))
    assert all(e["max_mem_gb"] > 0 for e in fast.log)
    first = json.loads((tmp_path / "fast" / "loss_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(plain.log[0]["loss"], rel=2e-2)
    assert fast.log[-1]["loss"] < fast.log[0]["loss"]
