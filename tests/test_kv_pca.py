"""method='pca' (attnzoo.conversion.kv_pca): calibrated KV-head merging. Exact where it is lossless in principle,
independent of the order of the calibration batches, grouping by similarity; end to end through patch() and
attnzoo convert on tiny models."""
from __future__ import annotations

import pytest
import torch
from hf_tiny import TINY
from test_conversion import D, F64, HD, N, _attend, _compressible

import attnzoo
from attnzoo.conversion import RopeSpec, convert_kv_heads
from attnzoo.conversion.calibration import LayerStatistics
from attnzoo.conversion.kv_pca import _Layer, similarity_groups

ROPES = [RopeSpec(0), RopeSpec(8, "half"), RopeSpec(4, "half"), RopeSpec(8, "interleaved")]
ROPE_IDS = ["no-rope", "rope-half", "partial-rotary", "rope-interleaved"]


def _stats(w, x: torch.Tensor) -> LayerStatistics:
    """The moments a calibration pass gathers, computed directly from inputs ``x`` ``[n, D]`` (no attention
    mixing: the raw value moments)."""
    def proj(t, b):
        return x @ t.T + (0 if b is None else b)

    q, k, v = proj(w.q, w.q_bias), proj(w.k, w.k_bias), proj(w.v, w.v_bias)
    qh = q.reshape(-1, w.heads, w.head_dim).transpose(0, 1)
    return LayerStatistics("layer", 0, w.heads, w.kv_heads, w.head_dim, count=x.shape[0],
                           q=qh.transpose(1, 2) @ qh, k=k.T @ k, v=v.T @ v)


def _gqa(w, heads):
    """``w`` with ``heads`` query heads (a GQA source: several query heads per KV head)."""
    return w.replace(q=torch.randn(heads * HD, D, dtype=F64), q_bias=None if w.q_bias is None else
                     torch.randn(heads * HD, dtype=F64), o=torch.randn(D, heads * HD, dtype=F64), heads=heads)


@pytest.mark.parametrize("rope", ROPES, ids=ROPE_IDS)
@pytest.mark.parametrize("bias", [False, True])
def test_exact_when_heads_share_a_basis(rope, bias):
    w = _gqa(_compressible(heads=4, groups=1, rope=rope, bias=bias), 8)  # 4 KV heads, 2 query heads each
    x = torch.randn(2, N, D, dtype=F64)
    stats = _stats(w, torch.randn(64, D, dtype=F64))
    ref = _attend(w, x, rope)
    for groups in (1, 2):
        got = convert_kv_heads(w, groups, "pca", rope, stats=stats)
        assert got.kv_heads == groups and got.q.shape == w.q.shape and got.o.shape == w.o.shape
        torch.testing.assert_close(_attend(got, x, rope), ref, rtol=1e-8, atol=1e-8)
    assert convert_kv_heads(w, 4, "pca", rope, stats=stats) is w  # groups = kv_heads: unchanged
    mean = convert_kv_heads(w, 1, "mean", rope)
    assert (_attend(mean, x, rope) - ref).norm() > 0.1 * ref.norm()


def test_identical_heads_are_exact_and_grouped_by_similarity():
    """KV heads 0 and 2 are equal, 1 and 3 are equal: pca pairs them (positional groups would not) and is exact."""
    rope = RopeSpec(8, "half")
    torch.manual_seed(0)
    k, v = torch.randn(2, HD, D, dtype=F64), torch.randn(2, HD, D, dtype=F64)
    w = _compressible(heads=4, groups=4, rope=rope, bias=False).replace(k=k[[0, 1, 0, 1]].reshape(-1, D),
                                                                          v=v[[0, 1, 0, 1]].reshape(-1, D))
    w = _gqa(w, 8)
    stats = _stats(w, torch.randn(64, D, dtype=F64))
    assert similarity_groups(_Layer(w, rope, stats), 2) == [[0, 2], [1, 3]]
    x = torch.randn(2, N, D, dtype=F64)
    got = convert_kv_heads(w, 2, "pca", rope, stats=stats)
    torch.testing.assert_close(_attend(got, x, rope), _attend(w, x, rope), rtol=1e-8, atol=1e-8)


def test_needs_statistics_and_beats_mean_on_correlated_inputs():
    rope = RopeSpec(8, "half")
    torch.manual_seed(1)
    w = _gqa(_compressible(heads=4, groups=4, rope=rope, bias=True), 8)  # 4 unrelated KV heads
    with pytest.raises(ValueError, match="calibration statistics"):
        convert_kv_heads(w, 1, "pca", rope)
    basis = torch.randn(D, 3, dtype=F64)  # inputs live near a 3-dim subspace: what calibration sees
    x = (torch.randn(2, N, 3, dtype=F64) @ basis.T) + 0.01 * torch.randn(2, N, D, dtype=F64)
    stats = _stats(w, (torch.randn(256, 3, dtype=F64) @ basis.T) + 0.01 * torch.randn(256, D, dtype=F64))
    ref = _attend(w, x, rope)
    err = {m: (_attend(convert_kv_heads(w, 2, m, rope, stats=stats), x, rope) - ref).norm() / ref.norm()
           for m in ("mean", "svd", "pca")}
    assert err["pca"] < 0.6 * min(err["mean"], err["svd"]), err


def _ids_file(path, rows):
    path.write_text(" ".join(str(int(i)) for i in rows.reshape(-1)))
    return str(path)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_patch_with_calibration_is_independent_of_batch_order(name, tmp_path):
    torch.manual_seed(2)
    rows = torch.randint(3, 97, (6, 12))
    model, inputs = TINY[name].make()
    ref = model(**inputs).logits
    a, b = (TINY[name].make()[0] for _ in range(2))
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    ra = attnzoo.patch(a, attnzoo.MQA(method="pca", calib=_ids_file(tmp_path / "a.ids", rows), calib_seq_len=12))
    attnzoo.patch(b, "mqa", method="pca", calib=_ids_file(tmp_path / "b.ids", rows.flip(0)), calib_seq_len=12)
    assert ra.options["calib"].endswith("a.ids") and "_converted" not in ra.options
    assert a.config.num_key_value_heads == 1
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        out = a(**inputs).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_convert_cli_with_pca(tmp_path):
    model, _ = TINY["llama"].make()
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    calib = _ids_file(tmp_path / "c.ids", torch.randint(3, 97, (4, 16)))
    from attnzoo.conversion.pipeline import convert_checkpoint

    res = convert_checkpoint(src, dst, "gqa", {"groups": 2, "method": "pca", "calib": calib, "calib_seq_len": 16},
                             progress=False)
    assert not res.streamed and res.native  # a calibrated method loads the model, the result stays plain HF
    back = attnzoo.from_pretrained(dst)
    assert back.config.num_key_value_heads == 2
    with pytest.raises(ValueError, match="calib_sequences"):
        attnzoo.GQA(groups=2, method="pca", calib_sequences=0)


@pytest.mark.parametrize("name", ["gpt2", "bert", "phi3", "gpt_neox"])
def test_pca_on_other_layouts(name, tmp_path):
    """Swapped (GPT-2, BERT), fused (phi3) and interleaved partial-rotary (GPT-NeoX) layouts calibrate and convert."""
    model, inputs = TINY[name].make()
    calib = _ids_file(tmp_path / "c.ids", torch.randint(3, 97, (3, 16)))
    report = attnzoo.patch(model, "mqa", calib=calib, calib_seq_len=16)
    assert report.options["method"] == "pca"  # the default where calib is given
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_pca_needs_a_model_that_runs_on_token_ids(tmp_path):
    model, _ = TINY["clip"].make()
    with pytest.raises(ValueError, match="token ids alone.*method='mean'"):
        attnzoo.patch(model, "mqa", calib=_ids_file(tmp_path / "c.ids", torch.randint(3, 97, (2, 8))), calib_seq_len=8)


def _twins(tmp_path):
    """Inputs, a calibration file and two tiny Llamas with the same random weights."""
    model, inputs = TINY["llama"].make()
    calib = _ids_file(tmp_path / "c.ids", torch.randint(3, 97, (4, 16)))
    twins = tuple(TINY["llama"].make()[0] for _ in range(2))
    for m in twins:
        m.load_state_dict(model.state_dict())
    return inputs, calib, twins


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["pca", "svd"])
def test_conversion_of_a_model_on_cuda_equals_the_cpu_conversion(method, tmp_path):
    """A model that lives on the GPU converts there (statistics and solutions on its device) to a model that computes
    what the CPU's conversion computes (weights may differ by the sign of an eigenvector, not the function)."""
    torch.manual_seed(5)
    inputs, calib, (cpu, gpu) = _twins(tmp_path)
    gpu.cuda()
    for m in (cpu, gpu):
        attnzoo.patch(m, "mqa", method=method, calib=calib, calib_seq_len=16)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert gpu.config.num_key_value_heads == cpu.config.num_key_value_heads == 1
    with torch.no_grad():
        want = cpu(**inputs).logits
        got = gpu(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_sequential_calibration_converts_layer_by_layer_on_the_converted_prefix(tmp_path, monkeypatch):
    """calib_order='sequential': layer 0 sees the same inputs either way, and its refit targets (the reference
    model's attention outputs) equal the parallel order's recomputed ones, so at the parallel order's ridge its
    weights are identical; layer 1 is measured on the converted layer 0's outputs (different weights); the model
    runs, and the report counts the KV bytes of the unconverted model before."""
    import attnzoo.patches.kv_heads as kv_heads

    monkeypatch.setattr(kv_heads, "SEQUENTIAL_REFIT_RIDGE", 1.0)  # the parallel order's
    torch.manual_seed(6)
    inputs, calib, (par, seq) = _twins(tmp_path)
    attnzoo.patch(par, "mqa", method="pca", calib=calib, calib_seq_len=16)
    report = attnzoo.patch(seq, attnzoo.MQA(method="pca", calib=calib, calib_seq_len=16, calib_order="sequential"))
    assert report.options["calib_order"] == "sequential" and "_converted" not in report.options
    assert report.kv_bytes_per_token_before == 4 * report.kv_bytes_per_token_after  # 4 KV heads -> 1
    p, s = dict(par.named_parameters()), dict(seq.named_parameters())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(s[f"model.layers.0.self_attn.{name}.weight"],
                                   p[f"model.layers.0.self_attn.{name}.weight"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(s["model.layers.1.self_attn.k_proj.weight"], p["model.layers.1.self_attn.k_proj.weight"])
    assert seq.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.isfinite(seq(**inputs).logits).all()


def test_sequential_calibration_refusals(tmp_path):
    calib = _ids_file(tmp_path / "c.ids", torch.randint(3, 97, (2, 16)))
    with pytest.raises(ValueError, match="calib_order.*'parallel'.*'sequential'"):
        attnzoo.MQA(method="pca", calib_order="greedy")
    model, _ = TINY["llama"].make()
    with pytest.raises(ValueError, match="needs the native layout"):  # a part of the layers: not a whole model
        attnzoo.patch(model, "mqa", layers=[1], method="pca", calib=calib, calib_seq_len=16,
                      calib_order="sequential")
    with pytest.raises(ValueError, match="mla converter calibrates in one pass"):
        attnzoo.MLA(kv_rank=16, rope_dim=8, calib_order="sequential")
