"""loss.png: training and validation curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.fileio import atomic_path


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # cut short by a power loss (or a kill, in a file from before append_line)
            continue
    return rows


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, png: Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG) and free it."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)


def plot_metrics(metrics_file: Path, png: Path, title: str = "") -> None:
    plt = pyplot()
    rows = read_metrics(metrics_file)
    if not rows:
        return
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    extra = sorted({k for r in rows for k in r if k.startswith("val_") and k not in ("val_loss", "val_bpb")
                    and isinstance(r[k], (int, float))})
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax2 = axes[0][1]
        for k in extra:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax2.plot(*zip(*pts), "o-", label=k)
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    save_png(fig, png)
