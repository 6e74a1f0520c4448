"""GPU: converted models on CUDA (the conversion maths in float64 on the device, the absorbed Triton decode over a
converted latent, the deepseek_v3 export in bfloat16). Run on a GPU machine: python -m pytest -q -m gpu
tests/test_mla_convert_gpu.py"""
import pytest
import torch
import transformers as tf

import attnzoo
from attnzoo.patches.mla import save_deepseek_v3_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_CFG = dict(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**_CFG, **kw})).to("cuda", dtype).eval()


def _greedy(model, ids, n=32):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_exact_conversion_on_cuda_prefill_and_absorbed_decode():
    model = _model()
    ids = torch.randint(3, 257, (2, 300), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
    attnzoo.patch(model, "mla", kv_rank=2 * 2 * 64 + 1, rope_dim=64, rope_keys="per_head", method="svd")
    with torch.no_grad():
        got = model(ids).logits
    assert (got - ref).abs().max().item() <= 1e-3
    out = _greedy(model, ids[:1, :100])
    full = out[:, :100]
    with torch.no_grad():
        for _ in range(32):
            full = torch.cat([full, model(full).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, full)  # absorbed decode from the latent cache == recomputation


def test_calibrated_low_rank_deepseek_export_in_bfloat16(tmp_path):
    model = _model()
    calib = tmp_path / "calib.ids"
    calib.write_text(" ".join(map(str, torch.randint(3, 257, (8 * 256,)).tolist())))
    attnzoo.patch(model, "mla", kv_rank=96, rope_dim=32, method="pca", calib=str(calib), calib_sequences=8,
                  calib_seq_len=256)
    save_deepseek_v3_model(model.to(torch.bfloat16), tmp_path / "ds")
    ds = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.randint(3, 257, (2, 200), device="cuda")
    with torch.no_grad():
        a, b = model(ids).logits.float(), ds(ids).logits.float()
    assert (a - b).abs().max().item() <= 5e-2 * a.abs().max().item()
    attnzoo.patch(ds, "mla")  # absorbed decode on the stock checkpoint
    assert _greedy(ds, ids[:1, :50]).shape == (1, 82)
