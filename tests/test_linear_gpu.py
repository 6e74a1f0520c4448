"""GPU: the linear op's fused Triton kernels in bf16/fp16 against the float64 reference, forward and backward
(causal, exponential key stabiliser, softmax window, grouped KV heads, padding, a partial last chunk); the state
carried across calls; the linear family's modules on CUDA against their float64 references; decoding a converted
HF model on CUDA.

Run on a GPU machine: ``python -m pytest -m gpu -q -rs tests/test_linear_gpu.py``. Skipped without CUDA.
"""
import pytest
import torch

import attnzoo
from attnzoo.ops.linear import linear_attention, linear_attention_naive

from oracle import linear_reference

pytestmark = pytest.mark.gpu

TOL = 2e-2  # ‖out − ref‖ / ‖ref‖


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(b, hq, hkv, n, f, d, dtype, gated):
    kw = dict(device="cuda", dtype=dtype)
    t = dict(qf=torch.rand(b, hq, n, f, **kw), kf=torch.rand(b, hkv, n, f, **kw), v=torch.randn(b, hkv, n, d, **kw),
             q=torch.randn(b, hq, n, d, **kw), k=torch.randn(b, hkv, n, d, **kw))
    if gated:
        t["q_log"] = torch.randn(b, hq, n, device="cuda") * 3
        t["k_log"] = torch.randn(b, hkv, n, device="cuda") * 3
    valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
    valid[-1, : n // 5] = False
    return t, valid


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("f,gated,window", [(64, False, 0), (256, True, 0), (128, True, 64), (128, True, 7),
                                            (64, False, 128)])
def test_fused_matches_float64_forward_and_backward(dtype, f, gated, window):
    t, valid = _inputs(2, 8, 2, 1000, f, 64, dtype, gated)
    leaves = {k: x.requires_grad_() for k, x in t.items()}
    out = linear_attention(**leaves, causal=True, key_padding_mask=valid, window=window, backend="triton")
    ref = linear_attention_naive(**{k: x.detach().cpu().double().requires_grad_() for k, x in leaves.items()},
                                 causal=True, key_padding_mask=valid.cpu(), window=window)
    assert _rel(out, ref) < TOL
    g = torch.randn_like(out)
    names = [k for k in leaves if window or k not in ("q", "k", "q_log")]
    got = torch.autograd.grad(out, [leaves[k] for k in names], g)
    ref_leaves = {k: x.detach().cpu().double().requires_grad_() for k, x in leaves.items()}
    ref = linear_attention_naive(**ref_leaves, causal=True, key_padding_mask=valid.cpu(), window=window)
    want = torch.autograd.grad(ref, [ref_leaves[k] for k in names], g.double().cpu())
    # the unfused torch backend in the same dtype: a gradient that sums many cancelling terms (q_log's, through a
    # gate of range e^±9) loses digits in 16 bits whatever computes it; the kernel must do no worse than 2x that
    t_leaves = {k: x.detach().clone().requires_grad_() for k, x in leaves.items()}
    base = linear_attention(**t_leaves, causal=True, key_padding_mask=valid, window=window, backend="torch")
    unfused = torch.autograd.grad(base, [t_leaves[k] for k in names], g)
    for name, a, b, c in zip(names, got, want, unfused):
        assert _rel(a, b) < max(3 * TOL, 2 * _rel(c, b)), (name, _rel(a, b), _rel(c, b))


def test_fused_equals_torch_backend_and_state_round_trip():
    t, valid = _inputs(1, 4, 4, 777, 128, 64, torch.bfloat16, True)
    a = linear_attention(**t, causal=True, key_padding_mask=valid, backend="triton")
    b = linear_attention(**t, causal=True, key_padding_mask=valid, backend="torch")
    assert _rel(a, b) < 1e-2
    s = 500
    first = {k: x[:, :, :s] for k, x in t.items()}
    o1, st = linear_attention(**first, causal=True, key_padding_mask=valid[:, :s], return_state=True, backend="triton")
    rest = {k: x[:, :, s:] for k, x in t.items() if k not in ("q", "k", "q_log")}
    o2 = linear_attention(**rest, causal=True, key_padding_mask=valid[:, s:], initial_state=st, backend="triton")
    assert _rel(torch.cat([o1, o2], 2), a) < 1e-2


@pytest.mark.parametrize("window", [1, 64])
def test_fused_window_equals_window_in_torch_and_state_round_trip(window, monkeypatch):
    """The fused window hybrid (checked to run) against the path with the window part in PyTorch beside the
    linear kernels, and prefill + continuation with its state (the module's cache convention: the last
    ``window`` keys prepended, their outputs dropped) against one call."""
    from attnzoo.ops.linear import triton_kernel
    from attnzoo.ops.linear.chunked import linear_attention_chunked

    calls = []
    inner = triton_kernel._win_forward
    monkeypatch.setattr(triton_kernel, "_win_forward", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    t, valid = _inputs(2, 8, 2, 2000, 128, 64, torch.bfloat16, True)
    a = linear_attention(**t, causal=True, key_padding_mask=valid, window=window, backend="triton")
    assert calls
    b = linear_attention_chunked(**t, causal=True, valid=valid, window=window,
                                 causal_fn=triton_kernel.causal_parts_fused)
    assert _rel(a, b) < 1e-2
    s = 1100
    first = {k: x[:, :, :s] for k, x in t.items()}
    o1, st = linear_attention(**first, causal=True, key_padding_mask=valid[:, :s], window=window,
                              return_state=True, backend="triton")
    rest = {k: x[:, :, s - window:] for k, x in t.items()}
    o2 = linear_attention(**rest, causal=True, key_padding_mask=valid[:, s - window:], window=window,
                          initial_state=st, backend="triton")
    assert _rel(torch.cat([o1, o2[:, :, window:]], 2), a) < 1e-2
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_favor_fused_matches_float64_forward_and_backward(dtype):
    """Non-causal FAVOR+ with the feature map fused into the two GEMMs (m = 256, head_dim 64, GQA, padding)."""
    from attnzoo.ops.linear.favor import exp_map_fits, favor_attention, favor_map
    from attnzoo.variants.feature_maps import favor_features, orthogonal_gaussian

    b, hq, hkv, n, d, m = 2, 8, 2, 1000, 64, 256
    proj = orthogonal_gaussian(m, d, 0).cuda()
    kw = dict(device="cuda", dtype=dtype)
    leaves = [torch.randn(b, hq, n, d, **kw), torch.randn(b, hkv, n, d, **kw), torch.randn(b, hkv, n, d, **kw)]
    leaves = [x.requires_grad_() for x in leaves]
    valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
    valid[-1, : n // 5] = False
    assert exp_map_fits(leaves[0], leaves[2], favor_map(proj, d**-0.5), favor_map(proj, d**-0.5))
    out = favor_attention(*leaves, proj, scale=d**-0.5, key_padding_mask=valid)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    qf, ql = favor_features(ref_leaves[0], proj.cpu().double(), d**-0.5)
    kf, kl = favor_features(ref_leaves[1], proj.cpu().double(), d**-0.5)
    ref = linear_attention_naive(qf, kf, ref_leaves[2], q_log=ql, k_log=kl, key_padding_mask=valid.cpu())
    assert _rel(out, ref) < TOL
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, ref_leaves, g.double().cpu())
    for name, a, w in zip("qkv", got, want):
        assert _rel(a, w) < 3 * TOL, name


@pytest.mark.parametrize("name,opts", [("performer", {"features": 64, "causal": True}),
                                       ("performer", {"features": 64}),
                                       ("linear", {"feature_map": "hedgehog", "causal": True, "window": 16}),
                                       ("linear", {"feature_map": "hedgehog"}),  # non-causal: the map fused
                                       ("linformer", {"k": 32, "max_len": 512})])
def test_modules_on_cuda_match_float64(name, opts):
    m = attnzoo.create(name, dim=256, heads=4, groups=2, **opts).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    kpm = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    kpm[1, 250:] = False
    with torch.no_grad():
        y = m(x, key_padding_mask=kpm)
    m64 = attnzoo.create(name, dim=256, heads=4, groups=2, **opts).double()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    from oracle import linformer_reference
    ref = (linformer_reference if name == "linformer" else linear_reference)(m64, x.double().cpu(),
                                                                            key_padding_mask=kpm.cpu())
    keep = kpm.cpu()[..., None]
    assert _rel(y.cpu() * keep, ref * keep) < 3 * TOL


@pytest.mark.parametrize("name,opts", [("performer", {"features": 64}),  # the fused map, token-major views
                                       ("performer", {"features": 64, "causal": True}),  # the feature-rows kernel
                                       ("linformer", {"k": 32, "max_len": 512})])  # the queries in batch pieces
def test_modules_on_cuda_backward_matches_float64(name, opts):
    """The gradients of the input and of every parameter that trains, bf16 on CUDA against float64 on the CPU."""
    m = attnzoo.create(name, dim=256, heads=4, groups=2, **opts).cuda().to(torch.bfloat16)
    m64 = attnzoo.create(name, dim=256, heads=4, groups=2, **opts).double()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x64 = x.detach().double().cpu().requires_grad_()
    g = torch.randn(2, 300, 256, dtype=torch.float64)
    m(x).backward(g.cuda().to(torch.bfloat16))
    m64(x64).backward(g)
    assert _rel(x.grad, x64.grad) < 3 * TOL, "input"
    for (k, p), p64 in zip(m.named_parameters(), m64.parameters()):
        if p.requires_grad and p64.grad is not None and p64.grad.norm() > 0:
            assert _rel(p.grad, p64.grad) < 3 * TOL, k


def test_converted_llama_decodes_on_cuda():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = tf.LlamaForCausalLM(cfg).cuda().eval()
    attnzoo.patch(model, "linear", feature_map="hedgehog", window=64)
    ids = torch.randint(3, 128, (2, 700), device="cuda")
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :-1], use_cache=True)
        from attnzoo.hf_compat import model_cache_kwarg, output_cache
        step = model(input_ids=ids[:, -1:], use_cache=True, **{model_cache_kwarg(model): output_cache(out)})
    assert _rel(step.logits[:, -1], full) < 1e-2  # the full forward on TF32 tensor-core dots
