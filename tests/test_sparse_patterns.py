"""Sparse patterns and the layout compiler, against masks written by explicit loops (tests/oracle.py)."""
import pytest
import torch

import attnzoo
from attnzoo.ops.sparse import BigBird, Fixed, Longformer, SlidingWindow, Strided, compile_layout, make_pattern
from attnzoo.ops.sparse import layout as layout_mod

from oracle import bigbird_keep, fixed_keep, longformer_keep, sliding_keep, strided_keep

# (pattern factory (causal) -> Pattern, loop mask (n, causal) -> bool [n, n])
CASES = {
    "sliding": (lambda c: SlidingWindow(window=3, causal=c), lambda n, c: sliding_keep(n, 3, c)),
    "sliding_w1": (lambda c: SlidingWindow(window=1, causal=c), lambda n, c: sliding_keep(n, 1, c)),
    "longformer": (lambda c: Longformer(window=2, global_tokens=(1, 9, 30), causal=c),
                   lambda n, c: longformer_keep(n, 2, (1, 9, 30), c)),
    "longformer_first2": (lambda c: Longformer(window=4, global_tokens=2, causal=c),
                          lambda n, c: longformer_keep(n, 4, 2, c)),
    "bigbird": (lambda c: BigBird(block_size=4, window=4, global_blocks=2, random_blocks=1, seed=3, causal=c),
                lambda n, c: bigbird_keep(n, 4, 4, 2, 1, 3, c)),
    "bigbird_wide": (lambda c: BigBird(block_size=3, window=6, global_blocks=1, random_blocks=2, causal=c),
                     lambda n, c: bigbird_keep(n, 3, 6, 1, 2, 0, c)),
    "strided": (lambda c: Strided(stride=4, causal=c), lambda n, c: strided_keep(n, 4, c)),
    "fixed": (lambda c: Fixed(stride=5, summary=2, causal=c), lambda n, c: fixed_keep(n, 5, 2, c)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [37, 40])
def test_keep_mask_matches_loops(case, causal, n):
    make, loops = CASES[case]
    got = make(causal).bind(n).keep_mask()
    assert torch.equal(got, loops(n, causal))


def _tiles_from_mask(keep, rows, tile):
    """(partial, full) bool [t, t] from a dense mask by loops over tiles; global rows excluded."""
    n = keep.shape[0]
    keep = keep.clone()
    keep[sorted(rows)] = False
    t = -(-n // tile)
    partial = torch.zeros(t, t, dtype=torch.bool)
    full = torch.zeros(t, t, dtype=torch.bool)
    for a in range(t):
        for b in range(t):
            sub = keep[a * tile:(a + 1) * tile, b * tile:(b + 1) * tile]
            if sub.any():
                full[a, b] = bool(sub.all())
                partial[a, b] = not sub.all()
    return partial, full


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, tile", [(37, 4), (37, 8), (40, 8), (33, 16), (31, 32)])
def test_layout_matches_dense_mask(case, causal, n, tile):
    make, loops = CASES[case]
    pattern = make(causal)
    keep = loops(n, causal)
    layout = compile_layout(pattern, n, tile)
    rows = set(layout.global_rows.tolist())
    partial, full = _tiles_from_mask(keep, rows, tile)
    t = partial.shape[0]
    assert layout.num_tiles == t
    assert torch.equal(layout.partial_count, partial.sum(1).int())
    assert torch.equal(layout.full_count, full.sum(1).int())
    for a in range(t):  # ascending lists of the visited tiles
        for count, index, want in ((layout.partial_count, layout.partial_index, partial),
                                   (layout.full_count, layout.full_index, full)):
            assert index[a, :int(count[a])].tolist() == want[a].nonzero().flatten().tolist()
    tm = layout.tile_map()
    assert torch.equal(tm == 1, partial) and torch.equal(tm == 2, full)
    assert layout.kept_total == int(keep.sum())
    assert layout.density == pytest.approx(keep.float().mean().item())
    assert layout.tiles_visited == int(partial.sum() + full.sum())


def test_sliding_256_on_128_tiles_visits_five_tiles_three_full():
    """The brief's arithmetic: ±256 on 128-tiles touches 5 KV tiles per query tile, 3 of them full."""
    layout = compile_layout(SlidingWindow(window=256), 4096, 128)
    inner = slice(2, layout.num_tiles - 2)
    assert (layout.full_count[inner] == 3).all() and (layout.partial_count[inner] == 2).all()
    assert 0.11 < layout.density < 0.13  # (2*256+1)/4096 minus the edges


def test_layouts_are_cached_per_shape():
    p = SlidingWindow(window=5)
    a = compile_layout(p, 50, 8)
    assert compile_layout(SlidingWindow(window=5), 50, 8) is a  # equal patterns share it
    assert compile_layout(p, 51, 8) is not a
    assert compile_layout(p, 50, 16) is not a
    layout_mod.clear_cache()
    assert compile_layout(p, 50, 8) is not a


def test_layout_compiles_in_chunks(monkeypatch):
    """Long sequences are evaluated a few query tiles at a time; the result is the same."""
    p = BigBird(block_size=4, window=4, random_blocks=2)
    whole = compile_layout(p, 61, 4)
    monkeypatch.setattr(layout_mod, "_CHUNK_ELEMENTS", 4 * 64)  # one query tile per chunk
    layout_mod.clear_cache()
    chunked = compile_layout(p, 61, 4)
    for name in ("partial_count", "partial_index", "full_count", "full_index"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))


def test_bigbird_random_blocks_are_seeded_and_causal_ones_do_not_depend_on_length():
    p = BigBird(block_size=4, window=4, random_blocks=2, seed=7)
    assert torch.equal(p.random_table(64), BigBird(block_size=4, window=4, random_blocks=2, seed=7).random_table(64))
    other = BigBird(block_size=4, window=4, random_blocks=2, seed=8)
    assert not torch.equal(p.random_table(64), other.random_table(64))
    c = BigBird(block_size=4, window=4, random_blocks=2, seed=7, causal=True)
    short, long = c.random_table(40), c.random_table(64)
    assert torch.equal(long[:10, :10], short)  # decoding sees the blocks the full forward saw
    assert (c.random_table(64).sum(1)[5:] == 2).all()  # enough earlier blocks: exactly random_blocks each


def test_bigbird_random_blocks_avoid_window_and_global_blocks():
    p = BigBird(block_size=2, window=2, global_blocks=2, random_blocks=3)
    table = p.random_table(40)
    nb = 20
    for qb in range(nb):
        picked = table[qb].nonzero().flatten().tolist()
        if qb in (0, nb - 1):
            assert picked == []
        else:
            assert len(picked) == 3
            assert all(abs(kb - qb) > 1 and kb not in (0, nb - 1) for kb in picked)


@pytest.mark.parametrize("make, exc, msg", [
    (lambda: SlidingWindow(window=0), ValueError, r"window=0: expected an integer >= 1"),
    (lambda: SlidingWindow(window=-3), ValueError, r"window=-3"),
    (lambda: SlidingWindow(window=2.5), TypeError, r"window=2.5"),
    (lambda: SlidingWindow(window=True), TypeError, r"window=True"),
    (lambda: SlidingWindow(window=4, causal=1), TypeError, r"causal=1"),
    (lambda: Longformer(window=0), ValueError, r"window=0"),
    (lambda: Longformer(window=2, global_tokens=-1), ValueError, r"global_tokens=-1"),
    (lambda: Longformer(window=2, global_tokens=(0, "x")), TypeError, r"global_tokens"),
    (lambda: Longformer(window=2, global_tokens=(0, -1), causal=True), ValueError, r"negative positions.*causal"),
    (lambda: BigBird(block_size=0), ValueError, r"block_size=0: expected an integer >= 1"),
    (lambda: BigBird(block_size=4, window=0), ValueError, r"window=0"),
    (lambda: BigBird(block_size=4, window=6), ValueError, r"window=6.*multiple of block_size=4 \(e\.g\. 4 or 8\)"),
    (lambda: BigBird(block_size=4, random_blocks=-1), ValueError, r"random_blocks=-1"),
    (lambda: BigBird(block_size=4, global_blocks=-2), ValueError, r"global_blocks=-2"),
    (lambda: Strided(stride=1), ValueError, r"stride=1: expected an integer >= 2"),
    (lambda: Fixed(stride=4, summary=5), ValueError, r"summary=5: expected 1 <= summary <= stride=4"),
    (lambda: Fixed(stride=4, summary=0), ValueError, r"summary=0"),
])
def test_bad_options_raise_clearly(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


@pytest.mark.parametrize("pattern, n, msg", [
    (BigBird(block_size=64, random_blocks=0), 50, r"block_size=64 does not fit a sequence of 50 tokens: expected "
                                                  r"1 <= block_size <= 50"),
    (BigBird(block_size=4, random_blocks=3), 24, r"random_blocks=3: a sequence of 24 tokens has 6 blocks.*at most 2 "
                                                 r".*expected random_blocks in \[0, 2\]"),
    (Longformer(window=2, global_tokens=(0, 40)), 30, r"global_tokens=\(0, 40\): position\(s\) \[40\] do not fit "
                                                      r"a sequence of 30 tokens: expected positions in \[-30, 29\]"),
    (Longformer(window=2, global_tokens=40), 30, r"global_tokens=40 does not fit a sequence of 30 tokens"),
])
def test_length_dependent_checks_raise_clearly(pattern, n, msg):
    with pytest.raises(ValueError, match=msg):
        compile_layout(pattern, n, 8)
    q = torch.randn(1, 2, n, 8)
    with pytest.raises(ValueError, match=msg):
        attnzoo.ops.sparse_attention(q, q, q, pattern)


def test_causal_patterns_grow_without_raising():
    """While decoding, a causal sequence starts short: rows take the random blocks that exist."""
    p = BigBird(block_size=4, window=4, random_blocks=3, causal=True)
    for n in (1, 3, 9, 24):
        keep = p.bind(n).keep_mask()
        assert torch.equal(keep, bigbird_keep(n, 4, 4, 2, 3, 0, True))


def test_make_pattern_names_and_options():
    assert make_pattern("sliding_window", window=4) == SlidingWindow(window=4)
    with pytest.raises(ValueError, match="Did you mean 'sliding_window'"):
        make_pattern("sliding_windw")
    with pytest.raises(ValueError, match="unknown option 'windw'.*Did you mean 'window'"):
        make_pattern("sliding_window", windw=4)


def test_variant_options_raise_through_create():
    with pytest.raises(ValueError, match="window=0"):
        attnzoo.create("sliding_window", dim=16, heads=2, window=0)
    with pytest.raises(ValueError, match="window=5.*multiple of block_size=2"):
        attnzoo.create("bigbird", dim=16, heads=2, block_size=2, window=5)
    with pytest.raises(ValueError, match="unknown option 'random_block'.*random_blocks"):
        attnzoo.create("bigbird", dim=16, heads=2, random_block=2)
    with pytest.raises(ValueError, match="context_dim=8.*self-attention"):
        attnzoo.create("longformer", dim=16, heads=2, context_dim=8)
    with pytest.raises(TypeError, match="global_projections=1"):
        attnzoo.create("longformer", dim=16, heads=2, global_projections=1)
