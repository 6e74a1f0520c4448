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


def _qkv64(m, x, context=None, positions=None):
    """q ``[B, H, N, hd]``, k and v ``[B, H_kv, M, hd]`` in float64 from the module's ``q/k/v_proj``, RoPE applied
    to q and k in self-attention (the shared front of the references of modules with those projections)."""
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
    return q, k, v


def dense_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None, project_out=True):
    c = m.config
    b, n, _ = x.shape
    hd = m.head_dim
    q, k, v = _qkv64(m, x, context, positions)
    o = naive_attention(q, k, v, causal=c.causal and context is None, mask=attn_mask,
                        key_padding_mask=key_padding_mask)
    if not project_out:
        return o  # [B, H, N, hd], before o_proj
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


REFERENCES = {"mha": dense_reference, "gqa": dense_reference, "mqa": dense_reference}


# ---------------------------------------------------------------------------- sparse patterns, by explicit loops
def _loop_mask(n, rule, causal):
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            keep[i, j] = bool(rule(i, j)) and (j <= i or not causal)
    return keep


def sliding_keep(n, window, causal=False):
    """|i - j| <= window: `window` keys on each side, the query's own position not counted."""
    return _loop_mask(n, lambda i, j: abs(i - j) <= window, causal)


def global_positions(n, global_tokens):
    if isinstance(global_tokens, int):
        return set(range(min(n, global_tokens)))
    return {p + n if p < 0 else p for p in global_tokens if -n <= p < n}


def longformer_keep(n, window, global_tokens, causal=False):
    g = global_positions(n, global_tokens)
    return _loop_mask(n, lambda i, j: abs(i - j) <= window or i in g or j in g, causal)


def bigbird_blocks(n, block_size, window, global_blocks, random_blocks, seed, causal):
    """(global block ids, {query block: set of random key blocks}), per the documented seeded draw:
    for each non-global query block qb, candidates = key blocks outside its window and not global
    (causal: before the window), permuted by torch.randperm with a Generator seeded seed*1000003+qb."""
    nb = -(-n // block_size)
    w = window // block_size
    g = min(global_blocks, nb)
    glob = set(range(g)) if causal else set(range(g - g // 2)) | set(range(nb - g // 2, nb))
    rand = {}
    for qb in range(nb):
        if qb in glob or random_blocks == 0:
            continue
        cand = [kb for kb in range(nb) if abs(kb - qb) > w and kb not in glob and (kb < qb or not causal)]
        if cand:
            perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed * 1_000_003 + qb))
            rand[qb] = {cand[p] for p in perm[:random_blocks].tolist()}
    return glob, rand


def bigbird_keep(n, block_size, window, global_blocks, random_blocks, seed=0, causal=False):
    glob, rand = bigbird_blocks(n, block_size, window, global_blocks, random_blocks, seed, causal)
    w = window // block_size

    def rule(i, j):
        qb, kb = i // block_size, j // block_size
        return abs(qb - kb) <= w or qb in glob or kb in glob or kb in rand.get(qb, ())
    return _loop_mask(n, rule, causal)


def strided_keep(n, stride, causal=False):
    return _loop_mask(n, lambda i, j: abs(i - j) < stride or (i - j) % stride == 0, causal)


def fixed_keep(n, stride, summary, causal=False):
    return _loop_mask(n, lambda i, j: i // stride == j // stride or j % stride >= stride - summary, causal)


def sparse_keep(config, n):
    """The keep mask of a sparse variant's config, from the loops above."""
    c = config
    kind = type(c).__name__
    if kind == "SlidingWindowConfig":
        return sliding_keep(n, c.window, c.causal)
    if kind == "LongformerConfig":
        return longformer_keep(n, c.window, c.global_tokens, c.causal)
    if kind == "BigBirdConfig":
        return bigbird_keep(n, c.block_size, c.window, c.global_blocks, c.random_blocks, c.seed, c.causal)
    if kind == "SparseStridedConfig":
        return strided_keep(n, c.stride, c.causal)
    if kind == "SparseFixedConfig":
        return fixed_keep(n, c.stride, c.summary, c.causal)
    raise AssertionError(kind)


def sparse_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    """A sparse module = the dense reference with the pattern's keep mask; Longformer's global
    projections recompute the global rows from q/k/v_global_proj over every key."""
    assert context is None and attn_mask is None
    n = x.shape[1]
    keep = sparse_keep(m.config, n)
    out = dense_reference(m, x, key_padding_mask=key_padding_mask, attn_mask=keep, positions=positions)
    c = m.config
    if not getattr(c, "global_projections", False):
        return out
    b, hd = x.shape[0], m.head_dim
    rows = sorted(global_positions(n, c.global_tokens))
    q = _lin(x, m.q_global_proj).view(b, n, c.heads, hd).transpose(1, 2)
    k = _lin(x, m.k_global_proj).view(b, n, m.kv_heads, hd).transpose(1, 2)
    v = _lin(x, m.v_global_proj).view(b, n, m.kv_heads, hd).transpose(1, 2)
    g = naive_attention(q, k, v, causal=c.causal, key_padding_mask=key_padding_mask)
    local = dense_reference(m, x, key_padding_mask=key_padding_mask, attn_mask=keep, positions=positions,
                            project_out=False)
    local = local.clone()
    local[:, :, rows] = g[:, :, rows]
    return _lin(local.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


REFERENCES.update({name: sparse_reference for name in
                   ("sliding_window", "longformer", "bigbird", "sparse_strided", "sparse_fixed")})


# ---------------------------------------------------------------------------- mla, written from DeepSeek-V2's equations
def _rms64(x, weight, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def mla_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    """MLA in float64: q (or q_b(norm(q_a x))), [c_raw; k_r] = kv_a x, c = norm(c_raw), per head
    k = [W_uk c; RoPE(k_r)], v = W_uv c, softmax scale 1/sqrt(nope + rope) unless set."""
    assert context is None
    c = m.config
    b, n, _ = x.shape
    hd, dr, dn, dv, r = m.nope_dim + m.rope_dim, m.rope_dim, m.nope_dim, m.v_dim, m.kv_rank
    rh = c.rope_heads
    if c.q_rank is None:
        q = _lin(x, m.q_proj)
    else:
        q = _lin(_rms64(_lin(x, m.q_a_proj), m.q_a_layernorm.weight, c.norm_eps), m.q_b_proj)
    q = q.view(b, n, c.heads, hd).transpose(1, 2)
    kv = _lin(x, m.kv_a_proj_with_mqa)
    lat, kr = kv[..., :r], kv[..., r:].reshape(b, n, rh, dr).transpose(1, 2)
    if c.latent_norm:
        lat = _rms64(lat, m.kv_a_layernorm.weight, c.norm_eps)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    if c.rope_interleave:  # DeepSeek's interleaved pairs, rotated and laid out evens-then-odds (as HF does)
        q_rope = torch.cat([q_rope[..., 0::2], q_rope[..., 1::2]], -1)
        kr = torch.cat([kr[..., 0::2], kr[..., 1::2]], -1)
    pos = torch.arange(n) if positions is None else positions
    if c.rope_inv_freq is None:
        q_rope, kr = _rope64(q_rope, pos, dr, c.rope_theta, "half"), _rope64(kr, pos, dr, c.rope_theta, "half")
    else:  # explicit frequencies: pair i of the half layout turns by inv_freq[i] per position
        ang = torch.tensor([[p * f for f in c.rope_inv_freq] for p in pos.tolist()], dtype=torch.float64)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = lambda t: t * cos + torch.cat([-t[..., dr // 2:], t[..., :dr // 2]], -1) * sin  # noqa: E731
        q_rope, kr = rot(q_rope), rot(kr)
    kvb = _lin(lat, m.kv_b_proj).view(b, n, c.heads, dn + dv).transpose(1, 2)
    k = torch.cat([kvb[..., :dn], kr.repeat_interleave(c.heads // rh, dim=1)], -1)
    v = kvb[..., dn:]
    scale = c.scale if c.scale is not None else 1 / math.sqrt(hd)
    o = naive_attention(torch.cat([q_nope, q_rope], -1), k, v, causal=c.causal, mask=attn_mask,
                        key_padding_mask=key_padding_mask, scale=scale)
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * dv), m.o_proj)


REFERENCES["mla"] = mla_reference
# arrcoc / visual_topk: without regions their modules are the dense layer they replace (the region path is
# checked against attnzoo.ops.regions' float64 reference in tests/test_arrcoc_lod.py)
REFERENCES.update({"arrcoc": dense_reference, "visual_topk": dense_reference})
# ---------------------------------------------------------------------------- reformer: buckets from the seeded hash
def reformer_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    """The buckets from attnzoo's seeded hash (their definition), the attention from attnzoo/ops/lsh/naive.py
    (every pair judged on its own, float64)."""
    from attnzoo.ops.lsh import lsh_attention_reference, num_buckets_for
    from attnzoo.variants.reformer import shared_keys

    assert context is None and attn_mask is None
    c = m.config
    b, n, _ = x.shape
    hd = m.head_dim
    q = _lin(x, m.q_proj).view(b, n, c.heads, hd).transpose(1, 2)
    v = _lin(x, m.v_proj).view(b, n, m.kv_heads, hd).transpose(1, 2)
    k = None if c.shared_qk else _lin(x, m.k_proj).view(b, n, m.kv_heads, hd).transpose(1, 2)
    if c.rope is not None:
        pos = torch.arange(n) if positions is None else positions
        rd = c.rope.rotary_dim or hd
        q = _rope64(q, pos, rd, c.rope.base, c.rope.style)
        k = None if k is None else _rope64(k, pos, rd, c.rope.base, c.rope.style)
    qb, kb = m.buckets(q, k, num_buckets_for(n, c.bucket_size, c.num_buckets), keep=key_padding_mask)
    keys = shared_keys(q) if k is None else k
    o = lsh_attention_reference(q, keys, v, qb, kb, bucket_size=c.bucket_size, causal=c.causal,
                                key_padding_mask=key_padding_mask, scale=1.0 if k is None else None)
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


REFERENCES["reformer"] = reformer_reference


# ---------------------------------------------------------------------------- the linear family, by explicit loops
def _phi64(m, x, which):
    """Feature rows of x [B,H,N,D] in float64, from the formulas: FAVOR+ exp(w.x' - |x'|^2/2)/sqrt(m) with
    x' = x sqrt(scale); hedgehog [exp(xW+b), exp(-(xW+b))]; t2r relu(xW+b); elu elu(xW+b)+1; keys times exp(log_gain) (window)."""
    x = x.double()
    scale = m.scale
    if getattr(m, "projection", None) is not None:
        w, kind = m.projection.double(), "favor"
    else:
        fm = m.q_feature_map if which == "q" else m.k_feature_map
        kind, w = fm.kind, fm.weight.double()
    gain = 1.0
    if kind != "favor" and fm.log_gain is not None:  # the keys' gain (a window's linear part)
        gain = fm.log_gain.double().exp()[None, :, None, None]
    if kind in ("favor", "performer"):
        xs = x * math.sqrt(scale)
        u = torch.einsum("bhnd,md->bhnm", xs, w) if w.dim() == 2 else torch.einsum("bhnd,hmd->bhnm", xs, w)
        return gain * torch.exp(u - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[-2])
    u = torch.einsum("bhnd,hde->bhne", x, w) + fm.bias.double()[None, :, None]
    if kind == "hedgehog":
        return gain * torch.cat([u.exp(), (-u).exp()], -1)
    if kind == "t2r":
        return gain * torch.relu(u)
    return gain * (torch.nn.functional.elu(u) + 1)


def linear_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    """performer / linear: w_ij = phi(q_i).phi(k_j) (window: exp(scale q_i.k_j) for 0 <= i-j < window), over the
    keys a query sees, normalised by sum_j w_ij."""
    assert context is None and attn_mask is None
    c = m.config
    b, n, _ = x.shape
    hd = m.head_dim
    q, k, v = _qkv64(m, x, positions=positions)
    pq, pk = _phi64(m, q, "q"), _phi64(m, k, "k")
    window = getattr(c, "window", 0)
    g = c.heads // m.kv_heads
    o = torch.zeros(b, c.heads, n, hd, dtype=torch.float64)
    for bi in range(b):
        for h in range(c.heads):
            for i in range(n):
                num, den = torch.zeros(hd, dtype=torch.float64), 0.0
                for j in range(n):
                    if c.causal and j > i or key_padding_mask is not None and not key_padding_mask[bi, j]:
                        continue
                    if window and 0 <= i - j < window:
                        w = torch.exp(q[bi, h, i] @ k[bi, h // g, j] * m.scale)
                    else:
                        w = pq[bi, h, i] @ pk[bi, h // g, j]
                    num, den = num + w * v[bi, h // g, j], den + w
                o[bi, h, i] = num / den if den > 0 else num
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


def linformer_reference(m, x, context=None, key_padding_mask=None, attn_mask=None, positions=None):
    """linformer: K' = E K_valid, V' = F V_valid (padding rows zeroed), softmax attention over the k slots."""
    assert context is None and attn_mask is None
    c = m.config
    b, n, _ = x.shape
    hd = m.head_dim
    q, k, v = _qkv64(m, x, positions=positions)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].double()
        k, v = k * keep, v * keep
    e = m.k_seq_proj.double()[..., :n]
    f = e if m.v_seq_proj is None else m.v_seq_proj.double()[..., :n]
    ks = torch.stack([e[h if e.shape[0] > 1 else 0] @ k[:, h] for h in range(m.kv_heads)], 1)
    vs = torch.stack([f[h if f.shape[0] > 1 else 0] @ v[:, h] for h in range(m.kv_heads)], 1)
    o = naive_attention(q, ks, vs, scale=m.scale)
    return _lin(o.transpose(1, 2).reshape(b, n, c.heads * hd), m.o_proj)


REFERENCES.update({"performer": linear_reference, "linear": linear_reference, "linformer": linformer_reference})
