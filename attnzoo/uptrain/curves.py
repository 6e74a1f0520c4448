"""The loss log (JSONL, one line per optimizer step) and loss-curve plots (PNG)."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_log", "append_log", "truncate_log", "plot_losses"]


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_log(path: str | Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_log(path: str | Path, last_step: int) -> None:
    """Drop entries after ``last_step`` (a resumed run re-logs the steps it redoes)."""
    kept = [e for e in read_log(path) if e["step"] <= last_step]
    Path(path).write_text("".join(json.dumps(e) + "\n" for e in kept))


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(curves: dict[str, list[dict]], path: str | Path, ax=None, key: str = "ce",
                title: str = "uptraining loss") -> None:
    """Plot ``key`` (default: the cross-entropy part) against tokens for each named log.

    With ``ax`` draws into it (the caller saves); otherwise writes ``path`` as a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    for label, log in curves.items():
        if not log:
            continue
        x = [e["tokens"] for e in log]
        y = [e.get(key, e["loss"]) for e in log]
        ax.plot(x, _smooth(y, max(1, len(y) // 20)), label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)" if key == "ce" else key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
