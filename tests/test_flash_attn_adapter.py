"""The flash_attn adapter (layout, varlen unpadding) against the oracle, through a stand-in module.

The real package is GPU-only (and has no wheel for our GPU machine); this checks attnzoo's side
of the contract: BNHD transposes, cu_seqlens and index bookkeeping, zeroed empty rows.
"""
import sys
import types

import torch

from attnzoo.ops.dense.backends import BACKENDS
from attnzoo.ops.dense.call import AttentionCall
from oracle import naive_attention


def _fake_flash_attn():
    """flash_attn_func / flash_attn_varlen_func with flash-attn's documented semantics, in float64."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                              scale=softmax_scale)
        return out.transpose(1, 2).to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False):
        outs = []
        for i in range(len(cu_q) - 1):
            qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
            ki = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
            vi = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
            if ki.shape[2] == 0:
                outs.append(torch.zeros(qi.shape[2], qi.shape[1], vi.shape[-1], dtype=q.dtype))
                continue
            outs.append(naive_attention(qi, ki, vi, causal=causal, scale=softmax_scale)[0].transpose(0, 1))
        return torch.cat(outs).to(q.dtype)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


def test_flash_attn_adapter_dense_and_unpadded(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    be = BACKENDS["flash_attn"]
    q = torch.randn(3, 4, 6, 8, dtype=torch.float64)
    k = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    v = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    for causal in (False, True):
        out = be.run(AttentionCall.build(q, k, v, causal=causal))
        torch.testing.assert_close(out, naive_attention(q, k, v, causal=causal))
    kpm = torch.ones(3, 9, dtype=torch.bool)
    kpm[0, 5:] = False
    kpm[1, :3] = False
    kpm[1, 6] = False  # holes anywhere: non-causal unpadding does not care about order
    kpm[2] = False  # a sequence with no key at all -> zeros
    out = be.run(AttentionCall.build(q, k, v, key_padding_mask=kpm, scale=0.2))
    torch.testing.assert_close(out, naive_attention(q, k, v, key_padding_mask=kpm, scale=0.2))
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_flash_attn_checks_say_why():
    q = torch.randn(1, 2, 4, 8)
    reason = BACKENDS["flash_attn"].check(AttentionCall.build(q, q, q))
    assert reason is not None and ("not installed" in reason or "CUDA" in reason)


def test_not_installed_names_the_extra_that_installs_it(monkeypatch):
    """flash_attn (FA2) comes with ``attnzoo[flash]``, flash_attn.cute (FlashAttention-4) with ``attnzoo[fa4]``."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "pip install 'attnzoo[flash]'" in BACKENDS["flash_attn"].available()
    assert "pip install 'attnzoo[fa4]'" in BACKENDS["flash_attn_cute"].available()
