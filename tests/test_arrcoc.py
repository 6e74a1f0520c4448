"""ARR-COC's texture array, scorers, balancer and token budget allocator (attnzoo.arrcoc)."""
import math

import pytest
import torch

from attnzoo.arrcoc import (CHANNEL_RANGES, CHANNELS, DEFAULT_LEVELS, CouplingScorer,
                            InformationScorer, RelevanceScorer, SalienceScorer, TensionBalancer, TokenBudgetAllocator,
                            entropy, grid_shape, region_index, texture_array)


def _photos():
    data = pytest.importorskip("skimage.data")
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None]
        out.append((name, img[:, :, ::4, ::4].contiguous()))  # a quarter of each side: fast, still a photograph
    return out


def _synthetic():
    g = torch.Generator().manual_seed(0)
    h = w = 24
    ramp = torch.linspace(0, 1, w).expand(3, h, w)
    checker = ((torch.arange(h)[:, None] // 4 + torch.arange(w)[None, :] // 4) % 2).float().expand(3, h, w)
    primaries = torch.zeros(3, h, w)
    for c in range(3):
        primaries[c, :, c * 8:(c + 1) * 8] = 1
    return [("noise", torch.rand(1, 3, h, w, generator=g)), ("black", torch.zeros(1, 3, h, w)),
            ("white", torch.ones(1, 3, h, w)), ("ramp", ramp[None]), ("checker", checker[None]),
            ("primaries", primaries[None])]


@pytest.mark.parametrize("name, image", _photos() + _synthetic(), ids=lambda v: v if isinstance(v, str) else "")
def test_texture_array_has_13_channels_in_their_ranges(name, image):
    t = texture_array(image)
    assert t.shape == (1, 13, *image.shape[2:]) and len(CHANNELS) == 13
    for i, c in enumerate(CHANNELS):
        lo, hi = CHANNEL_RANGES[c]
        assert lo - 1e-6 <= t[:, i].min() and t[:, i].max() <= hi + 1e-6, (name, c)
    assert t[:, CHANNELS.index("motion")].abs().max() == 0  # still images
    rgb = image.float() / 255 if image.dtype == torch.uint8 else image
    torch.testing.assert_close(t[:, :3], rgb)


def test_texture_channels_mean_what_they_say():
    white, black = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    tw, tb = texture_array(white), texture_array(black)
    assert torch.allclose(tw[:, 3], torch.ones(1)) and torch.allclose(tb[:, 3], torch.zeros(1), atol=1e-6)
    assert tw[:, 4:6].abs().max() < 1e-3  # white is achromatic in CIELAB
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).contiguous()
    t = texture_array(ramp)
    assert (t[:, CHANNELS.index("gx"), :, 1:-1] > 0).all() and t[:, CHANNELS.index("gy")].abs().max() < 1e-6
    x, y, ecc = (t[0, CHANNELS.index(c)] for c in ("x", "y", "ecc"))
    assert x[0, 0] < 0 < x[0, -1] and y[0, 0] < 0 < y[-1, 0] and ecc[0, 0] == ecc.max() and math.isclose(
        ecc.max().item(), 1.0, rel_tol=1e-6)
    moved = texture_array(white, previous=black)[:, CHANNELS.index("motion")]
    assert torch.allclose(moved, torch.ones(1))


def test_texture_known_lab_values():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    t = texture_array(red)
    lab = (t[0, 3, 0, 0] * 100, t[0, 4, 0, 0] * 128, t[0, 5, 0, 0] * 128)
    for got, want in zip(lab, (53.24, 80.09, 67.20)):  # sRGB red in CIELAB (D65)
        assert abs(got.item() - want) < 0.05


@pytest.mark.parametrize("bad, exc, msg", [
    (torch.zeros(1, 4, 8, 8), ValueError, "RGB"), (torch.full((1, 3, 8, 8), 2.0), ValueError, r"\[0, 1\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int32), TypeError, "uint8"), ([1, 2], TypeError, "torch.Tensor")])
def test_texture_array_rejects_bad_images(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        texture_array(bad)


@pytest.mark.parametrize("bins", [2, 7, 32, 256])
def test_entropy_of_a_uniform_histogram_is_ln_bins(bins):
    assert math.isclose(entropy(torch.full((bins,), 1 / bins, dtype=torch.float64)).item(), math.log(bins),
                        rel_tol=1e-12)
    one_hot = torch.zeros(bins, dtype=torch.float64)
    one_hot[0] = 1
    assert entropy(one_hot).item() == 0.0
    with pytest.raises(ValueError, match="probability"):
        entropy(torch.ones(bins))  # counts, not a distribution


def test_information_scorer_normalises_to_unit_range():
    # one region uniform over the 8 lightness bins, one constant: scores 1 and 0
    lum = torch.arange(8).float().add(0.5).div(8).repeat_interleave(2).view(1, 16).expand(16, 16)
    rgb = lum.expand(1, 3, 16, 16).clone()
    rgb[..., 8:] = 0.5  # right half constant
    t = texture_array(rgb)
    t[:, CHANNELS.index("L"), :, :8] = lum[:, :16].reshape(16, 16)[:, ::2]  # exactly uniform over the bins
    s = InformationScorer(bins=8)(t, 2)  # regions: top-left, top-right, bottom-left, bottom-right
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_centre_salience_beats_corners_for_equal_features():
    torch.manual_seed(0)
    tile = torch.rand(1, 3, 8, 8)
    image = tile.repeat(1, 1, 3, 3)  # the same texture in all 9 regions
    s = SalienceScorer()(texture_array(image), 3)[0]
    assert s[4] == s.max() and all(s[4] > s[i] for i in (0, 2, 6, 8))
    assert torch.all((0 <= s) & (s <= 1))
    flat = SalienceScorer()(texture_array(torch.full((1, 3, 12, 12), 0.5)), 3)
    assert flat.abs().max() < 1e-2


def test_coupling_of_a_vector_with_itself_is_one():
    torch.manual_seed(0)
    v = torch.randn(3, 16)
    feats = torch.stack([v, -v, torch.randn(3, 16)], 1)
    for scorer in (CouplingScorer(), CouplingScorer(dim=16)):
        c = scorer(feats, v)
        torch.testing.assert_close(c[:, 0], torch.ones(3))
        torch.testing.assert_close(c[:, 1], torch.zeros(3))
        assert torch.all((0 <= c) & (c <= 1))


def test_tension_balancer_navigate_and_defaults():
    b = TensionBalancer()
    assert [round(p.item(), 6) for p in b.parameters()] == [0.5, 0.6, 0.5]
    a, c = torch.tensor([0.2]), torch.tensor([0.8])
    assert TensionBalancer._navigate(a, c, torch.tensor(1.0)) == a and TensionBalancer._navigate(a, c, torch.tensor(
        0.0)) == c
    torch.testing.assert_close(TensionBalancer._navigate(a, c, torch.tensor(0.25)), torch.tensor([0.65]))
    i, s, cp = torch.rand(2, 5), torch.rand(2, 5), torch.rand(2, 5)
    want = (0.5 * i + 0.5 * s + 0.6 * cp + 0.4 * i + 0.5 * cp + 0.5 * s) / 3
    torch.testing.assert_close(b(i, s, cp), want)
    assert torch.all((0 <= b(i, s, cp)) & (b(i, s, cp) <= 1))
    with pytest.raises(ValueError, match="coupling_info=1.5"):
        TensionBalancer(coupling_info=1.5)


def test_relevance_scorer_runs_end_to_end():
    torch.manual_seed(0)
    t = texture_array(torch.rand(2, 3, 16, 16))
    out = RelevanceScorer()(t, 2, features=torch.randn(2, 4, 8), query=torch.randn(2, 8))
    assert set(out) == {"information", "salience", "coupling", "relevance"}
    assert all(v.shape == (2, 4) and bool(((0 <= v) & (v <= 1)).all()) for v in out.values())


def test_region_index_partitions_uneven_sizes():
    idx = region_index(7, 5, 2)
    assert idx.unique().tolist() == [0, 1, 2, 3] and idx[0, 0] == 0 and idx[-1, -1] == 3
    with pytest.raises(ValueError, match="grid=4"):
        region_index(3, 8, 4)


def test_grid_shape():
    assert grid_shape(64) == (8, 8) and grid_shape(80) == (8, 10) and grid_shape(400) == (20, 20)
    assert grid_shape(32, aspect=2.0) == (4, 8)
    for t in DEFAULT_LEVELS:
        r, c = grid_shape(t)
        assert r * c == t and r <= c


# ---------------------------------------------------------------------------- the allocator (properties: test_arrcoc_allocator.py)
def test_allocation_follows_relevance():
    alloc = TokenBudgetAllocator(budget=4 * 144)
    out = alloc.allocate([0.9, 0.1, 0.1, 0.1])
    assert out[0] > out[1] == out[2] == out[3] and sum(out) == 576
    assert alloc.allocate([0.5] * 4) == [144] * 4  # equal relevance: an even split
    hot = TokenBudgetAllocator(budget=4 * 144, temperature=10.0).allocate([0.9, 0.1, 0.1, 0.1])
    assert hot[0] - hot[1] < out[0] - out[1]  # a high temperature flattens the split


@pytest.mark.parametrize("kwargs, regions, msg", [
    ({"budget": 100}, None, r"budget=100: must be a multiple of 16 .* 96, 112"),
    ({"budget": 1600}, 196, r"budget=1600 is infeasible for 196 regions .* from 12544 to 78400"),
    ({"budget": 64 * 4 - 16}, 4, r"infeasible for 4 regions"),
    ({"budget": 1000}, 4, r"budget=1000: must be a multiple of 16"),
    ({"budget": 4 * 400 + 16}, 4, r"from 256 to 1600"),
    ({"budget": 0}, None, r"budget=0"),
    ({"budget": 256, "levels": (64, 32)}, None, r"levels=\(64, 32\): expected .* strictly increasing"),
    ({"budget": 256, "temperature": 0}, None, r"temperature=0"),
])
def test_allocator_errors_name_option_value_and_valid_range(kwargs, regions, msg):
    with pytest.raises(ValueError, match=msg):
        TokenBudgetAllocator(**kwargs).best_total(regions or 4)


def test_registry_lists_arrcoc_and_visual_topk():
    import attnzoo
    from attnzoo import registry

    assert {"arrcoc", "visual_topk"} <= set(attnzoo.list_variants())
    assert {"budget", "levels", "grid", "temperature"} <= set(registry.get("arrcoc").config_cls.option_names())
    with pytest.raises(ValueError, match="budget=100: must be a multiple of 16"):
        attnzoo.create("arrcoc", dim=8, heads=2, budget=100)
    with pytest.raises(ValueError, match="infeasible for 4 regions"):
        attnzoo.create("arrcoc", dim=8, heads=2, budget=128)  # grid 2: 4 regions x at least 64 tokens


def test_attnzoo_list_shows_arrcoc(capsys):
    from attnzoo.cli import main

    assert main(["list", "arrcoc"]) == 0
    out = capsys.readouterr().out
    assert "arrcoc" in out and "level of detail" in out


def test_plot_allocation_draws_levels_and_scores(tmp_path):
    pytest.importorskip("matplotlib")
    from attnzoo.arrcoc import plot_allocation
    from attnzoo.arrcoc.standalone import score_images

    torch.manual_seed(0)
    image = torch.rand(3, 48, 48)
    query = image[:, :24, 24:]  # the top-right region, as the example of what is asked for
    got = score_images(image[None], query, grid=2, budget=4 * 64, levels=tuple(range(16, 145, 16)))
    assert got["levels"].sum() == 256 and got["coupling"].argmax() == 1
    fig = plot_allocation(image, query, grid=2, budget=256, levels=tuple(range(16, 145, 16)),
                          path=tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and len(fig.axes) >= 5
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {f"{t}\n{'x'.join(map(str, grid_shape(t)))}" for t in got["levels"][0].tolist()} <= texts
