"""MLA on a GPU: every fused path against float64. Prefill/training (the expanded form on each dense backend that
serves q/k head dim != v head dim, forward and backward), the module, absorbed decode on the compiled split-KV
kernel (tuned launch), and a DeepSeek-V3 model's generate() on it. ``python -m pytest -m gpu tests/test_mla_gpu.py``."""
import copy

import pytest
import torch

import attnzoo
from attnzoo.errors import BackendUnavailableError
from attnzoo.ops import attention, attention_reference
from attnzoo.ops.mla import absorb_query, absorbed_output, latent_attention, mla_expanded_reference
from attnzoo.ops.mla import last_latent_decision

from oracle import mla_reference

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("backend", [None, "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_qk192_v128_fwd_bwd_against_float64(backend, dtype, padded):
    """DeepSeek's prefill shapes (q/k 192, v 128), causal, odd length, with and without key padding."""
    b, h, n = 2, 8, 301
    q = torch.randn(b, h, n, 192, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, n, 192, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, n, 128, device=DEV, dtype=dtype, requires_grad=True)
    kpm = None
    if padded:
        kpm = torch.ones(b, n, dtype=torch.bool, device=DEV)
        kpm[1, :37] = False
    try:
        out = attention(q, k, v, causal=True, key_padding_mask=kpm, backend=backend)
    except BackendUnavailableError as e:
        pytest.skip(f"{backend} does not serve q/k 192 with v 128 here: {e}")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qd, kd, vd, causal=True, key_padding_mask=kpm)
    rows = slice(None) if kpm is None else (1, slice(None), slice(37, None))  # padded queries see no key
    assert _rel(out[rows], ref[rows]) < 2e-2
    g = torch.randn_like(ref)
    if kpm is not None:
        g[1, :, :37] = 0
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for a, w in zip(got, want):
        assert _rel(a, w) < 3e-2


@pytest.mark.parametrize("opts", [dict(), dict(q_rank=64, rope_keys="per_head", kv_heads=4, rope_interleave=True)])
def test_module_prefill_fwd_bwd_bf16_against_float64(opts):
    m = attnzoo.create("mla", dim=256, heads=8, kv_rank=128, rope_dim=32, nope_dim=64, v_dim=48, causal=True,
                       **opts)
    ref_m = copy.deepcopy(m).double()
    m = m.to(DEV, torch.bfloat16)
    x = torch.randn(2, 129, 256, dtype=torch.float64)
    xg = x.to(DEV, torch.bfloat16).requires_grad_()
    y = m(xg)
    xr = x.clone().requires_grad_()
    ref = mla_reference(ref_m, xr)
    assert _rel(y.cpu(), ref) < 3e-2
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, xg, g.to(DEV, torch.bfloat16))
    (rx,) = torch.autograd.grad(ref, xr, g)
    assert _rel(gx.cpu(), rx) < 5e-2


@pytest.mark.parametrize("shape", [dict(h=128, r=512, dr=64, rh=1, s=1500),  # DeepSeek-V3
                                   dict(h=32, r=256, dr=64, rh=8, s=777),  # per-KV-head rope keys
                                   dict(h=16, r=512, dr=64, rh=1, s=20000)])  # long: several pieces
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_compiled_against_float64(shape, dtype):
    """fp32 <= 1e-4 and bf16 <= 2e-2 of the largest output against the expanded float64 reference, with left
    padding (fp32 inputs rounded from float64 and 576-term dots in IEEE float32 give ~1e-5 by themselves; the
    1e-5 bar holds on CPU, tests/test_mla_decode.py)."""
    h, r, dr, rh, s = shape["h"], shape["r"], shape["dr"], shape["rh"], shape["s"]
    b, dn, dv = 3, 128, 128
    q_nope, q_rope = torch.randn(b, h, 1, dn, dtype=torch.float64), torch.randn(b, h, 1, dr, dtype=torch.float64)
    c, k_rope = torch.randn(b, s, r, dtype=torch.float64), torch.randn(b, s, rh, dr, dtype=torch.float64)
    w_kb, w_vb = torch.randn(h, dn, r, dtype=torch.float64) / r ** 0.5, torch.randn(h, dv, r, dtype=torch.float64)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[2, :s // 3] = False
    scale = (dn + dr) ** -0.5
    want = mla_expanded_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, scale=scale, key_padding_mask=kpm)
    to = dict(device=DEV, dtype=dtype)
    o_lat = latent_attention(absorb_query(q_nope, w_kb).to(**to), q_rope.to(**to), c.to(**to), k_rope.to(**to),
                             scale=scale, key_padding_mask=kpm.to(DEV))
    assert last_latent_decision().backend == "triton"
    got = absorbed_output(o_lat.double().cpu(), w_vb)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("cfg", [dict(value_split=1, block_h=64, block_n=32, num_warps=8, num_stages=2),
                                 dict(value_split=2, block_h=64, block_n=32, num_warps=4, num_stages=2),
                                 dict(value_split=2, block_h=32, block_n=64, num_warps=8, num_stages=2),
                                 dict(value_split=1, block_h=32, block_n=16, num_warps=4, num_stages=1)],
                         ids=["whole-h64", "vhalf-h64", "vhalf-h32", "whole-h32-n16"])
@pytest.mark.parametrize("splits", [1, 5])
def test_decode_variants_compiled_at_deepseek_shapes_against_float64(cfg, splits):
    """Both kernel variants (all value columns in one program, or half in each of two), one piece or several,
    bf16 at DeepSeek's widths with left padding, against the expanded float64 reference (2e-2 of the largest)."""
    from attnzoo.ops.mla.triton_decode import DecodeConfig, latent_decode

    b, h, r, dr, s, dn, dv = 3, 128, 512, 64, 3001, 128, 128
    q_nope, q_rope = torch.randn(b, h, 1, dn, dtype=torch.float64), torch.randn(b, h, 1, dr, dtype=torch.float64)
    c, k_rope = torch.randn(b, s, r, dtype=torch.float64), torch.randn(b, s, 1, dr, dtype=torch.float64)
    w_kb, w_vb = torch.randn(h, dn, r, dtype=torch.float64) / r ** 0.5, torch.randn(h, dv, r, dtype=torch.float64)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[2, : s // 3] = False
    scale = (dn + dr) ** -0.5
    want = mla_expanded_reference(q_nope, q_rope, c, k_rope, w_kb, w_vb, scale=scale, key_padding_mask=kpm)
    to = dict(device=DEV, dtype=torch.bfloat16)
    o_lat = latent_decode(absorb_query(q_nope, w_kb).to(**to), q_rope.to(**to), c.to(**to), k_rope.to(**to),
                          scale=scale, key_padding_mask=kpm.to(DEV), config=DecodeConfig(**cfg, splits=splits))
    got = absorbed_output(o_lat.double().cpu(), w_vb)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_deepseek_v3_generate_on_the_kernel_equals_full_recomputation():
    from test_mla_generate import _deepseek, _greedy, _prompt

    hf = _deepseek().to(DEV)
    ours = copy.deepcopy(hf)
    attnzoo.patches.hf.absorb_deepseek_attention(ours)
    ids, mask = (t.to(DEV) for t in _prompt())
    with torch.no_grad():
        want = _greedy(hf, ids, mask, use_cache=False)
        got = _greedy(ours, ids, mask, use_cache=True)
    assert last_latent_decision().backend == "triton"
    assert torch.equal(got, want)
