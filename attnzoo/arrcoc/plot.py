"""Pictures of an ARR-COC allocation: :func:`plot_allocation`.

``attnzoo.arrcoc.plot_allocation(image, query, grid=3, budget=9 * 64, levels=(16, 32, ..., 144), path="a.png")``
draws the image with each region's level (its token count, and its ``rows x cols`` patch grid drawn inside the
region: the level of detail the region is encoded at), beside heat maps of the four scores (information,
salience, coupling with the query, relevance). ``scores=`` draws what an :class:`~attnzoo.arrcoc.plugin.
ArrcocPlugin` decided on a VLM (``plugin.allocate(...)`` or ``plugin.last``) instead of scoring tower-free.
"""
from __future__ import annotations

import torch

from ..plot import _pyplot
from .allocator import grid_shape
from .standalone import score_images
from .texture import as_unit_rgb

__all__ = ["plot_allocation"]

_PANELS = ("information", "salience", "coupling", "relevance")


def plot_allocation(image: torch.Tensor, query: torch.Tensor | None = None, *, grid: int = 2, budget: int = 576,
                    levels=None, temperature: float = 0.1, scores: dict | None = None, title: str | None = None,
                    path=None):
    """Draw ``image`` (RGB ``[3, H, W]``, uint8 or [0, 1]) with its regions' levels and the four scores.

    Args:
        image: the picture.
        query: an example picture of what is asked for (tower-free coupling,
            :func:`attnzoo.arrcoc.standalone.score_images`), or None (no coupling).
        grid, budget, levels, temperature: as ``patch(vlm, "arrcoc", ...)``.
        scores: precomputed scores and ``levels`` of this one image (each ``[R]`` or ``[1, R]``) instead.
        title: figure title (default: budget and total).
        path: also save the figure there (PNG at 150 dpi).

    Returns:
        The matplotlib ``Figure``.
    """
    rgb = as_unit_rgb(image.unsqueeze(0) if image.dim() == 3 else image, name="image")[:1].float()
    if scores is None:
        scores = score_images(rgb, query, grid=grid, budget=budget, levels=levels, temperature=temperature)
    got = {k: torch.as_tensor(v).detach().float().cpu().reshape(-1) for k, v in scores.items()}
    r = got["levels"].numel()
    grid = int(round(r ** 0.5))
    if grid * grid != r:
        raise ValueError(f"scores hold {r} regions: expected grid x grid")
    plt = _pyplot(headless=path is not None)
    fig, axes = plt.subplots(1, 1 + len(_PANELS), figsize=(4.2 * (1 + len(_PANELS)) * 0.8, 4),
                             gridspec_kw={"width_ratios": [1.6] + [1] * len(_PANELS)})
    _, h, w = rgb[0].shape
    ax = axes[0]
    ax.imshow(rgb[0].permute(1, 2, 0).numpy(), extent=(0, w, h, 0))
    ys = [i * h // grid for i in range(grid)] + [h]
    xs = [j * w // grid for j in range(grid)] + [w]
    lv = got["levels"].long().tolist()
    top = max(lv) or 1
    for i in range(grid):
        for j in range(grid):
            t = lv[i * grid + j]
            y0, y1, x0, x1 = ys[i], ys[i + 1], xs[j], xs[j + 1]
            rows, cols = grid_shape(t, (x1 - x0) / (y1 - y0))
            for a in range(1, rows):  # the region's patch grid: its level of detail
                ax.plot([x0, x1], [y0 + a * (y1 - y0) / rows] * 2, color="white", lw=0.3, alpha=0.6)
            for b in range(1, cols):
                ax.plot([x0 + b * (x1 - x0) / cols] * 2, [y0, y1], color="white", lw=0.3, alpha=0.6)
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="#f4a259",
                                       lw=1 + 3 * t / top))
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{t}\n{rows}x{cols}", ha="center", va="center", fontsize=9,
                    color="black", bbox={"facecolor": "white", "alpha": 0.75, "lw": 0})
    ax.set_title(title or f"tokens per region (total {sum(lv)} of budget {budget if scores is None else sum(lv)})",
                 fontsize=10)
    ax.axis("off")
    for ax, name in zip(axes[1:], _PANELS):
        v = got.get(name)
        if v is None:
            ax.axis("off")
            continue
        im = ax.imshow(v.view(grid, grid).numpy(), vmin=0, vmax=1, cmap="viridis")
        for i in range(grid):
            for j in range(grid):
                ax.text(j, i, f"{v[i * grid + j]:.2f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[1:]), fraction=0.02)
    if path is not None:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig
