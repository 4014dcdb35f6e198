"""Several runs side by side: one metric of each on one chart, and the figures each run ended with.

Everything comes from the runs' metrics.jsonl, so any training verb's run compares with any other
(a metric a run never logged is simply absent from its line and its row).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.errors import LMForgeError
from .plot import pyplot, read_metrics, save_png

X_AXES = {"step": "step", "tokens": "tokens", "elapsed_s": "training time (s)"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if _number(r.get(key))), None)


def read_run(run: Path) -> list[dict]:
    """A run's metrics rows; refused when it has none to compare."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise LMForgeError(f"{run} has no metrics.jsonl: not the directory of a training run")
    rows = read_metrics(metrics)
    if not rows:
        raise LMForgeError(f"{metrics} has no rows yet")
    return rows


def final_figures(run: Path, rows: list[dict], metric: str) -> dict:
    """What a run ended with (None where it logged no such figure): its last step, tokens, training
    time (elapsed_s) and loss, its best validation loss, last val_bpb and last value of `metric`."""
    val_losses = [r["val_loss"] for r in rows if _number(r.get("val_loss"))]
    figures = {"run": str(run), "steps": _last(rows, "step"), "tokens": _last(rows, "tokens"),
               "elapsed_s": _last(rows, "elapsed_s"), "final_loss": _last(rows, "loss"),
               "best_val_loss": min(val_losses) if val_losses else None, "final_val_bpb": _last(rows, "val_bpb")}
    return {**figures, f"final_{metric}": _last(rows, metric)}


def compare_runs(runs: list[Path], metric: str = "val_loss", x: str = "step", png: Path | None = None) -> dict:
    """Plot `metric` of every run against `x` (step, tokens or elapsed_s) on one chart, written to
    `png`, and return {"metric", "x", "plot", "runs": [final_figures of each run]}. A metric that
    no run logged is refused, naming the ones they did."""
    if x not in X_AXES:
        raise LMForgeError(f"the x axis must be one of {', '.join(X_AXES)}, not {x!r}")
    if not runs:
        raise LMForgeError("give at least one run directory")
    twice = sorted({str(r) for r in runs if runs.count(r) > 1})
    if twice:
        raise LMForgeError(f"{twice[0]} is given twice")
    rows = {run: read_run(run) for run in runs}
    series = {run: [(r[x], r[metric]) for r in rs if _number(r.get(x)) and _number(r.get(metric))]
              for run, rs in rows.items()}
    if not any(series.values()):
        logged = sorted({k for rs in rows.values() for r in rs for k, v in r.items() if _number(v)} - set(X_AXES))
        raise LMForgeError(f"no run logged {metric!r} against {x} (their metrics: {', '.join(logged)})")
    if png is not None:
        _plot(series, metric, x, png)
    return {"metric": metric, "x": x, "plot": str(png) if png is not None else None,
            "runs": [final_figures(run, rs, metric) for run, rs in rows.items()]}


def _plot(series: dict[Path, list[tuple[float, float]]], metric: str, x: str, png: Path) -> None:
    plt = pyplot()
    names = [run.name for run in series]
    if len(set(names)) < len(names):  # runs/a/final and runs/b/final: name them by their whole path
        names = [str(run) for run in series]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in zip(names, series.values()):
        if points:  # a run without the metric keeps its name out of the legend
            ax.plot(*zip(*points), "o-" if len(points) <= 30 else "-", markersize=3, label=name, alpha=0.85)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {X_AXES[x]}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, png)
