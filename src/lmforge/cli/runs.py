"""The verb `runs compare`: its flags and its function, over `lmforge.training.compare`.

Torch-free (matplotlib is imported when the chart is drawn), so `--help` answers at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.config import arg, from_namespace


@dataclass
class RunsCompareArgs:
    """Compare training runs of any verb: one metric of each on one chart (PNG), and a table of the
    figures each ended with (last loss, best val_loss, last val_bpb, steps, tokens, training time),
    all read from their metrics.jsonl. With --json, the table is one JSON object on stdout."""

    dirs: list[str] = arg([], "run directories (each with its metrics.jsonl)", positional=True)
    metric: str = arg("val_loss", "the metrics.jsonl key to plot: loss, val_loss, val_bpb, lr, tokens_per_sec, "
                      "val_accuracy, rewards/margins, ...")
    x: str = arg("step", "the x axis: optimizer steps, tokens trained on, or training time in seconds",
                 choices=["step", "tokens", "elapsed_s"])
    out: str = arg("compare.png", "the chart to write")
    json: bool = arg(False, "print the table as one JSON object")


def compare(ns) -> None:
    a = from_namespace(RunsCompareArgs, ns)
    from ..training.compare import compare_runs

    result = compare_runs([Path(d) for d in a.dirs], a.metric, a.x, Path(a.out))
    for r in result["runs"]:
        if r[f"final_{a.metric}"] is None:
            print(f"note: {r['run']} logged no {a.metric}", file=sys.stderr)
    print(json.dumps(result) if a.json else format_table(result))
    print(f"chart: {result['plot']}", file=sys.stderr)


def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "time":
        minutes, seconds = divmod(float(value), 60)
        return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"
    return f"{value:.4g}"


def format_table(result: dict) -> str:
    """One line per run: the figures it ended with, '-' where it logged none."""
    columns = [("steps", "steps", "int"), ("tokens", "tokens", "int"), ("elapsed_s", "time", "time"),
               ("final_loss", "loss", "num"), ("best_val_loss", "best val_loss", "num"),
               ("final_val_bpb", "val_bpb", "num")]
    metric = f"final_{result['metric']}"
    if metric not in {key for key, _, _ in columns}:
        columns.append((metric, result["metric"], "num"))
    table = [["run", *(title for _, title, _ in columns)]]
    table += [[r["run"], *(_cell(r[key], kind) for key, _, kind in columns)] for r in result["runs"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in table)
