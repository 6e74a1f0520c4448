"""attnzoo.plot_pattern / plot_zoo: figures with the kept fraction in each title, PNGs on disk."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import attnzoo  # noqa: E402


def test_plot_pattern_returns_a_figure_and_saves_png(tmp_path):
    path = tmp_path / "sw.png"
    fig = attnzoo.plot_pattern("sliding_window", n=64, window=4, tile=16, path=path)
    ax = fig.axes[0]
    assert "kept 13.6% of the score matrix" in ax.get_title()  # (64*9 - 2*(1+2+3+4)) / 64**2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_pattern_into_given_axes_and_options():
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    attnzoo.plot_pattern("bigbird", n=48, ax=axes[0], block_size=4, random_blocks=1, title="bb")
    attnzoo.plot_pattern("sparse_fixed", n=48, ax=axes[1], stride=8, summary=2, causal=True)
    assert axes[0].get_title().startswith("bb\nkept")
    assert "sparse_fixed(stride=8, summary=2, causal)" in axes[1].get_title()
    plt.close(fig)


def test_plot_zoo(tmp_path):
    fig = attnzoo.plot_zoo(tmp_path / "zoo.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 6 and all("of the score matrix" in t for t in titles)
    assert titles[0].startswith("dense\nkept 100.0%")


def test_plot_pattern_bad_name_or_option():
    with pytest.raises(ValueError, match="Did you mean 'bigbird'"):
        attnzoo.plot_pattern("bigbrd", n=16)
    with pytest.raises(ValueError, match="window=0"):
        attnzoo.plot_pattern("sliding_window", n=16, window=0)
