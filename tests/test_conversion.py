"""attnzoo.conversion: the weight mathematics and the safetensors streaming primitives, on bare tensors."""
import math
import os

import pytest
import torch

from attnzoo.conversion import AttnWeights, RopeSpec, check_groups, convert_kv_heads, valid_groups
from attnzoo.conversion.layouts import merge_concat, split_concat, split_conv1d, split_interleaved
from attnzoo.conversion.positions import extend_positions
from attnzoo.conversion.safetensors_io import ShardWriter, read_header
from attnzoo.ops import apply_rope, inv_frequencies, rope_cos_sin

D, HD, N = 24, 8, 7
F64 = torch.float64


def _attend(w: AttnWeights, x: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Float64 attention of layer ``w`` on ``x`` [b, n, D] (causal, RoPE as specified)."""
    b, n, _ = x.shape

    def proj(t, bias, heads):
        y = x @ t.T + (0 if bias is None else bias)
        return y.view(b, n, heads, w.head_dim).transpose(1, 2)

    q, k, v = proj(w.q, w.q_bias, w.heads), proj(w.k, w.k_bias, w.kv_heads), proj(w.v, w.v_bias, w.kv_heads)
    if rope.rotary_dim:
        cos, sin = rope_cos_sin(torch.arange(n), inv_frequencies(rope.rotary_dim).double(), rope.style, dtype=F64)
        q, k = apply_rope(q, cos, sin, rope.style), apply_rope(k, cos, sin, rope.style)
    g = w.heads // w.kv_heads
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(w.head_dim)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1) @ w.o.T


def _compressible(heads: int, groups: int, rope: RopeSpec, bias: bool) -> AttnWeights:
    """Weights whose KV heads are, within each group, exact per-head transforms of one shared head
    (complex scalars on rotated pairs, any matrix elsewhere): what method='svd' recovers exactly."""
    r = heads // groups
    a, b = rope.pairs()
    ks, vs, kbs, vbs = [], [], [], []
    for _ in range(groups):
        kg, vg = torch.randn(HD, D + 1, dtype=F64), torch.randn(HD, D + 1, dtype=F64)
        for _ in range(r):
            c = torch.randn(HD, HD, dtype=F64)
            k = kg.clone()
            if rope.rotary_dim:
                z = torch.complex(k[a], k[b]) * torch.polar(torch.rand(len(a), 1, dtype=F64) + 0.5,
                                                           torch.rand(len(a), 1, dtype=F64) * 6)
                k[a], k[b] = z.real, z.imag
                k[rope.rotary_dim:] = c[rope.rotary_dim:, rope.rotary_dim:] @ kg[rope.rotary_dim:]
            else:
                k = c @ kg
            v = c @ vg
            ks.append(k[:, :D]), vs.append(v[:, :D]), kbs.append(k[:, D]), vbs.append(v[:, D])
    return AttnWeights(q=torch.randn(heads * HD, D, dtype=F64), k=torch.cat(ks), v=torch.cat(vs),
                       o=torch.randn(D, heads * HD, dtype=F64), heads=heads, head_dim=HD,
                       q_bias=torch.randn(heads * HD, dtype=F64) if bias else None,
                       k_bias=torch.cat(kbs) if bias else None, v_bias=torch.cat(vbs) if bias else None)


@pytest.mark.parametrize("rope", [RopeSpec(0), RopeSpec(8, "half"), RopeSpec(4, "half"), RopeSpec(8, "interleaved")],
                         ids=["no-rope", "rope-half", "partial-rotary", "rope-interleaved"])
@pytest.mark.parametrize("bias", [False, True])
def test_svd_is_exact_when_heads_share_a_basis_and_mean_is_not(rope, bias):
    w = _compressible(heads=4, groups=2, rope=rope, bias=bias)
    x = torch.randn(2, N, D, dtype=F64)
    ref = _attend(w, x, rope)
    svd = convert_kv_heads(w, 2, "svd", rope)
    assert svd.kv_heads == 2 and svd.q.shape == w.q.shape and svd.o.shape == w.o.shape
    torch.testing.assert_close(_attend(svd, x, rope), ref, rtol=1e-9, atol=1e-9)
    mean = convert_kv_heads(w, 2, "mean", rope)
    assert (_attend(mean, x, rope) - ref).norm() > 0.1 * ref.norm()


def test_svd_with_gqa_source_folds_into_every_query_head_of_a_kv_head():
    rope = RopeSpec(8, "half")
    base = _compressible(heads=4, groups=1, rope=rope, bias=True)  # 4 KV heads sharing one basis
    w = base.replace(q=torch.randn(8 * HD, D, dtype=F64), q_bias=torch.randn(8 * HD, dtype=F64),
                     o=torch.randn(D, 8 * HD, dtype=F64), heads=8)  # 8 query heads, 2 per KV head
    x = torch.randn(2, N, D, dtype=F64)
    torch.testing.assert_close(_attend(convert_kv_heads(w, 1, "svd", rope), x, rope), _attend(w, x, rope),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["mean", "svd"])
def test_same_groups_is_identity_and_more_groups_repeat_exactly(method):
    w = _compressible(heads=4, groups=2, rope=RopeSpec(8), bias=True)
    assert convert_kv_heads(w, 4, method) is w
    w2 = convert_kv_heads(w, 2, method, RopeSpec(8))
    up = convert_kv_heads(w2, 4, method)
    x = torch.randn(1, N, D, dtype=F64)
    torch.testing.assert_close(_attend(up, x, RopeSpec(8)), _attend(w2, x, RopeSpec(8)), rtol=1e-12, atol=1e-12)
    assert torch.equal(up.k.view(2, 2, HD, D)[:, 0], up.k.view(2, 2, HD, D)[:, 1])


def test_group_checks():
    assert valid_groups(12, 4) == [1, 2, 4, 12]
    assert check_groups(2, 8, 4) == 2
    with pytest.raises(ValueError, match=r"groups=3: must divide the 8 query heads of L0; valid groups: \[1, 2, 4, 8\]"):
        check_groups(3, 8, 4, "L0")
    with pytest.raises(TypeError, match="groups=2.0"):
        check_groups(2.0, 8, 4)
    with pytest.raises(ValueError, match="method='x'"):
        convert_kv_heads(_compressible(4, 2, RopeSpec(), False), 2, "x")


def test_layouts_round_trip():
    q, k, v = torch.randn(8 * 4, 16), torch.randn(2 * 4, 16), torch.randn(2 * 4, 16)
    fused = merge_concat(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(split_concat(fused, 8, 2, 4), (q, k, v)))
    inter = torch.stack([q.view(8, 4, 16), q.view(8, 4, 16) + 1, q.view(8, 4, 16) + 2], 1).reshape(-1, 16)
    sq, sk, sv = split_interleaved(inter, 8, 4)
    assert torch.equal(sq, q) and torch.equal(sk, q + 1) and torch.equal(sv, q + 2)
    (cq, ck, cv), (bq, bk, bv) = split_conv1d(torch.cat([q, q + 1, q + 2]).t(), torch.arange(96.0), 32)
    assert torch.equal(cq, q) and torch.equal(cv, q + 2) and torch.equal(bk, torch.arange(32.0, 64.0))
    with pytest.raises(ValueError, match="fused qkv has 40 rows"):
        split_concat(torch.randn(40, 16), 8, 2, 4)


def test_shard_writer_streams_and_reader_checks(tmp_path):
    a, b = torch.randn(3, 5), torch.arange(7, dtype=torch.int64)
    src = tmp_path / "src.safetensors"
    w = ShardWriter(src, [("a", a.dtype, (3, 5)), ("b", b.dtype, (7,))], {"format": "pt"})
    w.write("a", a)
    w.write("b", b)
    w.close()
    from safetensors.torch import load_file

    got = load_file(src)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    infos, meta = read_header(src)
    assert meta == {"format": "pt"} and infos["b"].size == 56
    dst = tmp_path / "dst.safetensors"
    w = ShardWriter(dst, [("b", b.dtype, (7,)), ("a", a.dtype, (3, 5))])
    fd = os.open(src, os.O_RDONLY)
    w.copy("b", fd, infos["b"].start)
    w.copy_run(["a"], fd, infos["a"].start)
    os.close(fd)
    w.close()
    assert torch.equal(load_file(dst)["a"], a)
    bad = ShardWriter(tmp_path / "x.safetensors", [("a", a.dtype, (3, 5))])
    with pytest.raises(RuntimeError, match="expected 'a'"):
        bad.write("b", b)
    bad.close(check=False)
    src.write_bytes(src.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_header(src)


def test_extend_positions_copies_rows():
    w = torch.randn(10, 3)
    out = extend_positions(w, 20, offset=2)  # RoBERTa-like: 2 reserved rows, 8 learned
    assert out.shape == (22, 3)
    assert torch.equal(out[:2], w[:2]) and torch.equal(out[2:10], w[2:]) and torch.equal(out[10:18], w[2:])
    assert torch.equal(out[18:22], w[2:6])
    assert torch.equal(extend_positions(w, 10), w)  # BERT-like, same size: unchanged
    with pytest.raises(ValueError, match="max_positions=7: smaller than the 8 positions"):
        extend_positions(w, 7, offset=2)
