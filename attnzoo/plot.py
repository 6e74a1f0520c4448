"""Pictures of attention patterns: :func:`plot_pattern` and the pattern zoo (:func:`plot_zoo`).

``attnzoo.plot_pattern("bigbird", n=256, block_size=16, random_blocks=2)`` draws which keys
(columns) each query (row) attends to, titled with the kept fraction of the score matrix;
``tile=`` shades the tiles a block-sparse kernel visits (full tiles darker than partial ones).
Regenerate the figure in docs/ with ``python -c "import attnzoo; attnzoo.plot_zoo('docs/pattern_zoo.png')"``.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["plot_pattern", "plot_zoo", "ZOO"]

#: The zoo figure's panels: (title, pattern name, options), at n=256.
ZOO: list[tuple[str, str, dict[str, Any]]] = [
    ("dense", "dense", {}),
    ("strided (Sparse Transformer)", "sparse_strided", {"stride": 16, "causal": True}),
    ("fixed (Sparse Transformer)", "sparse_fixed", {"stride": 32, "summary": 4, "causal": True}),
    ("sliding window ±16", "sliding_window", {"window": 16}),
    ("sliding ±16 + 8 global tokens", "longformer", {"window": 16, "global_tokens": (0, 1, 2, 3, 160, 161, 162, 163)}),
    ("BigBird (block 8, 2 global, 2 random)", "bigbird",
     {"block_size": 8, "window": 8, "global_blocks": 2, "random_blocks": 2}),
]


_COLORS = ["#f4f4f4", "#fbe3a6", "#f4a259", "#1f4e9c"]  # skipped, partial tile, full tile, kept


def _pyplot(headless: bool):
    import matplotlib

    if headless:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, name: str, n: int, title: str | None, tile: int | None, options: dict) -> float:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .ops.sparse import compile_layout, make_pattern

    pattern = make_pattern(name, **options)
    keep = pattern.bind(n).keep_mask()
    kept = keep.float().mean().item()
    image = keep.to(torch.int8) * 3  # 3: kept; 1/2: inside a visited partial/full tile; 0: skipped
    if tile:
        layout = compile_layout(pattern, n, tile)
        tiles = layout.tile_map().repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :n]
        image = torch.where(keep, image, tiles)
        for p in range(tile, n, tile):  # tile boundaries (full tiles are all blue)
            ax.axhline(p - 0.5, color="white", lw=0.6)
            ax.axvline(p - 0.5, color="white", lw=0.6)
        ax.legend(handles=[Patch(color=_COLORS[1], label=f"partial {tile}x{tile} tile: mask evaluated"),
                           Patch(color=_COLORS[3], label="kept (full tiles: all kept)")],
                  loc="upper right", fontsize=7, framealpha=0.9)
    ax.imshow(image.numpy(), cmap=ListedColormap(_COLORS), interpolation="nearest", vmin=0, vmax=3,
              extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    ax.set_title(f"{title or pattern.describe()}\nkept {kept:.1%} of the score matrix", fontsize=10)
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position", fontsize=8)
    ax.tick_params(labelsize=7)
    return kept


def plot_pattern(name: str, n: int = 256, *, tile: int | None = None, title: str | None = None, path=None,
                 ax=None, **options):
    """Draw pattern ``name`` (see :data:`attnzoo.ops.sparse.PATTERNS`) at length ``n``.

    Args:
        name: ``"dense"``, ``"sliding_window"``, ``"longformer"``, ``"bigbird"``, ``"sparse_strided"``,
            ``"sparse_fixed"``.
        n: sequence length (the picture is ``n x n``).
        tile: shade the tiles a block-sparse kernel visits with this tile size (full / partial).
        title: panel title (default: the pattern and its options); the kept fraction is appended.
        path: also save the figure there (PNG at 150 dpi).
        ax: draw into this matplotlib Axes instead of a new figure.
        **options: the pattern's options (``window``, ``global_tokens``, ``block_size``, ``causal``, ...).

    Returns:
        The matplotlib ``Figure``.
    """
    plt = _pyplot(headless=ax is None and path is not None)
    fig = ax.figure if ax is not None else plt.figure(figsize=(4, 4.3))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    _draw(ax, name, n, title, tile, options)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=150)
    return fig


def plot_zoo(path=None, n: int = 256):
    """The attention pattern zoo: dense, strided, fixed, sliding, sliding + global, BigBird (2 x 3 panels)."""
    plt = _pyplot(headless=path is not None)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6))
    for ax, (title, name, options) in zip(axes.flat, ZOO):
        _draw(ax, name, n, title, None, options)
    fig.suptitle(f"attnzoo: attention patterns at n={n} (row = query, column = key; blue = attends)", fontsize=12)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig

