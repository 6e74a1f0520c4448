"""The demo's outputs: the comparison table (text and markdown) and the figure (loss curves + quality bars)."""
from __future__ import annotations

from pathlib import Path

from ..table import format_table, markdown_table

__all__ = ["COLUMNS", "table_rows", "text_table", "markdown", "plot"]

COLUMNS = ["model", "perplexity", "recall ppl", "recall acc", "KV B/token", "decode tok/s", "gap recovered"]


def table_rows(results: list[dict]) -> list[dict]:
    """One row per evaluated model; ``gap recovered`` = share of the perplexity lost by conversion
    that uptraining won back: ``(ppl_converted - ppl) / (ppl_converted - ppl_original)``."""
    by_name = {r["name"]: r for r in results}
    original = results[0]["eval"]["perplexity"]
    rows = []
    for r in results:
        e = r["eval"]
        row = {"model": r["name"], "perplexity": e["perplexity"], "recall ppl": e["recall_perplexity"],
               "recall acc": e["recall_accuracy"], "KV B/token": e["kv_bytes_per_token"],
               "decode tok/s": e["decode_tokens_per_s"], "gap recovered": None}
        start = by_name.get(r.get("from") or "")
        if start is not None:
            gap = start["eval"]["perplexity"] - original
            if gap > 0:
                row["gap recovered"] = f"{100 * (start['eval']['perplexity'] - e['perplexity']) / gap:.1f}%"
        rows.append(row)
    return rows


def text_table(results: list[dict], title: str = "") -> str:
    return format_table(table_rows(results), COLUMNS, title=title)


def markdown(results: list[dict]) -> str:
    return markdown_table(table_rows(results), COLUMNS)


def plot(results: list[dict], curves: dict[str, list[dict]], path: str | Path) -> None:
    """Left: uptraining cross-entropy vs tokens (original and converted levels as lines).
    Right: perplexity and recall accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import math

    from ..uptrain.curves import plot_losses

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    plot_losses(curves, path, ax=ax0, title="uptraining (train cross-entropy)")
    for r, style in ((results[0], "k--"),):
        ax0.axhline(math.log(r["eval"]["perplexity"]), color="k", ls="--", lw=1, label=f"{r['name']} (eval)")
    ax0.legend(fontsize=8)
    names = [r["name"] for r in results]
    ppl = [r["eval"]["perplexity"] for r in results]
    acc = [r["eval"]["recall_accuracy"] or 0.0 for r in results]
    x = range(len(names))
    bars = ax1.bar([i - 0.2 for i in x], ppl, width=0.4, color="tab:blue", label="perplexity (left)")
    ax1.set_ylabel("perplexity (lower is better)")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax2 = ax1.twinx()
    bars2 = ax2.bar([i + 0.2 for i in x], acc, width=0.4, color="tab:orange", label="recall accuracy (right)")
    ax2.set_ylabel("recall accuracy (higher is better)")
    ax2.set_ylim(0, 1)
    for b, v in zip(bars, ppl):
        ax1.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    for b, v in zip(bars2, acc):
        ax2.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax1.set_title("quality on held-out built-in data")
    ax1.legend(handles=[bars, bars2], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
