"""metrics.jsonl and the progress bar: what a run reports while it trains."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..core.fileio import append_line, atomic_write
from .plot import read_metrics
from .tracking import Board


class MetricsLog:
    """Rows of metrics.jsonl (one per --log-every steps, evaluations and the final step) and the
    progress bar. Every rank keeps the running numbers; only the main one writes and draws.

    tokens_per_sec counts every process's tokens; tokens_per_sec_per_process is its share; and
    where the device's peak is known (CUDA), mfu is the model FLOPs utilisation of each process:
    training FLOPs per token x its tokens/s / its GPU's dense bf16 peak.

    With `board` (a directory), the main rank writes each row to TensorBoard event files there too."""

    def __init__(self, path: Path, main: bool, windows_per_epoch: int, world: int = 1,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 board: Path | None = None) -> None:
        self.path, self.main, self.per_epoch = path, main, max(windows_per_epoch, 1)
        self.world, self.flops_per_token, self.peak = world, flops_per_token, peak_flops
        self.board = Board(board) if board is not None and main else None
        self.bar: tqdm | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss, self.tokens, self.steps, self.since = 0.0, 0, 0, time.perf_counter()

    def start(self, resumed_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed one drops the rows logged after its
        checkpoint (those steps run, and are logged, again). Call on the main rank only."""
        rows: list[dict] = []
        if resumed_step is None:
            self.path.unlink(missing_ok=True)
        else:
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        if self.board is not None:
            self.board.start(resumed_step, rows)

    def open_bar(self, progress: float) -> None:
        # initial=: the bar starts where the run stands, so its rate and ETA count new progress only
        self.bar = tqdm(total=100, initial=100 * min(progress, 1.0), disable=not self.main, unit="%",
                        dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
                        mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
        self._reset()

    def add(self, loss: float, tokens: int) -> None:
        """One optimizer step's loss and tokens."""
        self.loss, self.tokens, self.steps = self.loss + loss, self.tokens + tokens, self.steps + 1

    def row(self, state: dict, lr: float, grad_norm: float | None) -> dict:
        """The row for the current step: losses averaged over the steps since the last row."""
        rate = self.tokens / max(time.perf_counter() - self.since, 1e-9)
        row = {"step": state["step"], "tokens": state["tokens"], "loss": round(self.loss / max(self.steps, 1), 6),
               "lr": lr, "tokens_per_sec": round(rate, 1), "tokens_per_sec_per_process": round(rate / self.world, 1),
               "elapsed_s": round(state["elapsed"], 2), "epoch": round(state["windows"] / self.per_epoch, 4)}
        if self.flops_per_token and self.peak:
            row["mfu"] = round(self.flops_per_token * rate / self.world / self.peak, 4)
        if grad_norm is not None:
            row["grad_norm"] = round(grad_norm, 4)
        return row

    def write(self, row: dict) -> None:
        if self.main:
            append_line(self.path, json.dumps(row))  # a kill mid-write leaves the row whole or absent
            if self.board is not None:
                self.board.write(row)
            post = {"step": row["step"], "loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_sec']:,.0f}"}
            if "mfu" in row:
                post["mfu"] = f"{100 * row['mfu']:.0f}%"
            if "val_loss" in row:
                post["val"] = f"{row['val_loss']:.3f}"
            if self.bar is not None:
                self.bar.set_postfix(post, refresh=False)
        self._reset()

    def progress(self, fraction: float) -> None:
        if self.bar is not None:
            self.bar.update(100 * min(fraction, 1.0) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.board is not None:
            self.board.close()


class TaskMetrics:
    """A task's own running training metrics (a mixin): `note` adds values (names with / are written
    a__b), the loop's `take_metrics` reads {name: (sum, count)} for `metric_names` and starts afresh."""

    metric_names: tuple[str, ...] = ()

    def note(self, **values) -> None:
        sums = self.__dict__.setdefault("_sums", {})
        for name, v in values.items():
            s = sums.setdefault(name.replace("__", "/"), [0.0, 0.0])
            s[0] += float(v.detach().float().sum())
            s[1] += v.numel()

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        sums = self.__dict__.pop("_sums", {})
        return {n: tuple(sums.get(n, (0.0, 0.0))) for n in self.metric_names}
