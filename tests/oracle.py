"""Float64 references written independently of attnzoo (the test oracle).

``REFERENCES`` maps every registered variant to a function
``(module, x, context=None, key_padding_mask=None, attn_mask=None) -> y`` computing the
module's output from its weights in float64, by explicit per-head loops. A variant
registered without an entry here fails ``test_registry_has_reference``.
"""
from __future__ import annotations

import math

import torch


def naive_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None):
    """q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D*] -> [B,Hq,Nq,Dv] in float64, one (batch, head) at a time."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            s = q[bi, h] @ k[bi, h // g].T * scale  # [nq, nk]
            keep = torch.ones(nq, nk, dtype=torch.bool)
            if causal:
                for i in range(nq):
                    for j in range(nk):
                        keep[i, j] = j <= i + (nk - nq)
            if key_padding_mask is not None:
                keep &= key_padding_mask[bi].bool()[None, :]
            if mask is not None:
                m = mask.expand(b, hq, nq, nk) if mask.dim() == 4 else mask.expand(nq, nk)
                keep &= m[bi, h] if mask.dim() == 4 else m
            s = s.masked_fill(~keep, float("-inf"))
            p = torch.softmax(s, -1)
            p = torch.nan_to_num(p, nan=0.0)  # rows with nothing to attend to -> 0
            out[bi, h] = p @ v[bi, h // g]
    return out


def _lin(x, layer):
    w = layer.weight.double()
    y = x.double() @ w.T
    return y + layer.bias.double() if layer.bias is not None else y


def _rope64(x, positions, rotary_dim, base, style):
    """Rotate the first rotary_dim dims of x [B,H,N,D] (float64), written from the RoFormer formula."""
    x = x.clone()
    half = rotary_dim // 2
    for idx, pos in enumerate(positions.tolist()):
        for i in range(half):
            theta = pos * base ** (-2 * i / rotary_dim)
            c, s = math.cos(theta), math.sin(theta)
            a, b = (i, i + half) if style == "half" else (2 * i, 2 * i + 1)
            xa, xb = x[..., idx, a].clone(), x[..., idx, b].clone()
            x[..., idx, a] = xa * c - xb * s
            x[..., idx, b] = xb * c + xa * s
    return x


def dense_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    c = m.config
    b, n, _ = x.shape
    hd = m.head_dim
    src = x if context is None else context
    q = _lin(x, m.q_proj).view(b, n, c.heads, hd).transpose(1, 2)
    k = _lin(src, m.k_proj).view(b, src.shape[1], m.kv_heads, hd).transpose(1, 2)
    v = _lin(src, m.v_proj).view(b, src.shape[1], m.kv_heads, hd).transpose(1, 2)
    if c.rope is not None and context is None:
        pos = torch.arange(n) if positions is None else positions
        rd = c.rope.rotary_dim or hd
        q, k = _rope64(q, pos, rd, c.rope.base, c.rope.style), _rope64(k, pos, rd, c.rope.base, c.rope.style)
    o = naive_attention(q, k, v, causal=c.causal and context is None, mask=attn_mask,
                        key_padding_mask=key_padding_mask)
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


REFERENCES = {"mha": dense_reference, "gqa": dense_reference, "mqa": dense_reference}
