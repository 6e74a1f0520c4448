"""The demo's outputs: the comparison table (text and markdown) with its notes, and the figure
(loss curves + perplexity bars).

What the headline table shows, and why (docs/main-job.md, "What the demo table shows"):

* perplexity, the share of the conversion's perplexity gap that uptraining won back, recall
  perplexity (next to its uniform level) and KV-cache bytes per token;
* recall accuracy only when some model is clearly above chance (``RECALL_SKILL`` x chance); the
  built-in 1.9M model never learned the recall task, so its rows sit at chance and a note says so
  (the numbers stay in demo_results.json);
* no decode speed: on this model it is per-step Python overhead plus machine load, with run-to-run
  swings larger than any difference between the models (measured; see the doc).
"""
from __future__ import annotations

from pathlib import Path

from ..data.vocab import NUM_VALUES
from ..table import format_table, markdown_table

__all__ = ["COLUMNS", "RECALL_CHANCE", "RECALL_SKILL", "columns", "table_rows", "notes", "text_table", "markdown",
           "plot", "figure"]

RECALL_CHANCE = 1 / NUM_VALUES  # top-1 accuracy of a guess among the values
RECALL_UNIFORM_PPL = NUM_VALUES  # recall perplexity of a uniform guess among the values
RECALL_SKILL = 2.0  # recall accuracy is shown once some model reaches this multiple of chance

RECALL_PPL = f"recall ppl (uniform: {RECALL_UNIFORM_PPL})"
COLUMNS = ["model", "perplexity", "gap recovered", RECALL_PPL, "KV B/token"]


def _recall_learned(results: list[dict]) -> bool:
    accs = [r["eval"].get("recall_accuracy") for r in results]
    return any(a is not None and a >= RECALL_SKILL * RECALL_CHANCE for a in accs)


def columns(results: list[dict]) -> list[str]:
    """The headline columns: :data:`COLUMNS`, plus ``recall acc`` when some model learned recall."""
    return COLUMNS[:4] + ["recall acc"] + COLUMNS[4:] if _recall_learned(results) else list(COLUMNS)


def table_rows(results: list[dict]) -> list[dict]:
    """One row per evaluated model; ``gap recovered`` = share of the perplexity lost by conversion
    that uptraining won back: ``(ppl_converted - ppl) / (ppl_converted - ppl_original)``."""
    by_name = {r["name"]: r for r in results}
    original = results[0]["eval"]["perplexity"]
    rows = []
    for r in results:
        e = r["eval"]
        row = {"model": r["name"], "perplexity": e["perplexity"], RECALL_PPL: e["recall_perplexity"],
               "recall acc": e["recall_accuracy"], "KV B/token": e["kv_bytes_per_token"], "gap recovered": None}
        start = by_name.get(r.get("from") or "")
        if start is not None:
            gap = start["eval"]["perplexity"] - original
            if gap > 0:
                row["gap recovered"] = f"{100 * (start['eval']['perplexity'] - e['perplexity']) / gap:.1f}%"
        rows.append(row)
    return rows


def notes(results: list[dict]) -> list[str]:
    """What a reader needs next to the table (chance levels, what is left out and why)."""
    out = ["gap recovered = (ppl of the conversion it started from - ppl) / (that ppl - original ppl)."]
    accs = [r["eval"]["recall_accuracy"] for r in results if r["eval"].get("recall_accuracy") is not None]
    if accs and not _recall_learned(results):
        out.append(f"Recall accuracy is at or below chance for every model ({min(accs):.3f} to {max(accs):.3f}; chance = "
                   f"1/{NUM_VALUES} = {RECALL_CHANCE:.3f}): this model never learned the recall task, so the "
                   f"column is left out (it is in demo_results.json). Recall ppl above {RECALL_UNIFORM_PPL} means "
                   "confidently wrong on answer tokens: conversion damage, not lost skill.")
    out.append("Decode speed is not measured here: on a model this small it is per-step overhead and machine load, "
               "not attention (use `attnzoo eval` on a real model).")
    return out


def text_table(results: list[dict], title: str = "") -> str:
    import textwrap

    return format_table(table_rows(results), columns(results), title=title) + "\n" + "\n".join(
        textwrap.fill(n, 100, initial_indent="* ", subsequent_indent="  ") for n in notes(results))


def markdown(results: list[dict]) -> str:
    return markdown_table(table_rows(results), columns(results)) + "\n\n" + "\n".join(
        f"- {n}" for n in notes(results))


def plot(results: list[dict], curves: dict[str, list[dict]], path: str | Path) -> None:
    """Write :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results, curves)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(results: list[dict], curves: dict[str, list[dict]]):
    """Left: uptraining cross-entropy vs tokens (the original's eval level as a line).
    Right: perplexity per model, labelled, with the original's as a line; its legend sits above the
    axes, clear of the bars and their labels."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..uptrain.curves import plot_losses

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.3]})
    plot_losses(curves, None, ax=ax0, title="uptraining (train cross-entropy)")
    first = results[0]
    ax0.axhline(math.log(first["eval"]["perplexity"]), color="k", ls="--", lw=1, label=f"{first['name']} (eval)")
    ax0.legend(fontsize=8, loc="upper right")
    names = [r["name"] for r in results]
    ppl = [r["eval"]["perplexity"] for r in results]
    x = list(range(len(names)))
    colors = ["tab:gray" if r.get("from") is None and i else "tab:blue" for i, r in enumerate(results)]
    colors[0] = "k"
    bars = ax1.bar(x, ppl, width=0.6, color=colors)
    ref = ax1.axhline(ppl[0], color="k", ls="--", lw=1)
    for b, v in zip(bars, ppl):
        ax1.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 2),
                     textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax1.set_ylim(0, max(ppl) * 1.12)  # room for the labels above the tallest bar
    ax1.set_ylabel("perplexity (lower is better)")
    ax1.set_xticks(x)
    ax1.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax1.set_title("perplexity on held-out built-in data", pad=28)
    handles = [bars.patches[0], bars.patches[1] if len(bars.patches) > 1 else bars.patches[0], ref]
    labels = ["original (MHA)", "converted (before uptraining)", "original's level"]
    if any(r.get("from") for r in results):
        handles.insert(2, next(b for b, r in zip(bars.patches, results) if r.get("from")))
        labels.insert(2, "uptrained")
    ax1.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels), fontsize=8,
               frameon=False)
    fig.tight_layout()
    return fig
