"""Checkpoints: state/ for --resume (always the last step) and the model directory (the last
step's weights, or with keep=best those of the lowest validation loss)."""

from __future__ import annotations

import contextlib
import sys

import torch
from tqdm import tqdm

from ..core.runtime import Dist
from ..formats.modeldir import save_weights
from .plot import plot_metrics
from .rundir import Run
from .sharded import full_weights, is_sharded, write_shards
from .state import save_state


class Checkpointer:
    """Writes on the main rank; the others wait for its outcome at each save (and fail with it),
    so no rank runs ahead of a checkpoint that might fail. The best evaluation so far lives in the
    trainer record (record["best"]), so a resumed run goes on comparing against it. Under --fsdp
    every rank first writes its shards and sends its part of the full weights to rank 0."""

    def __init__(self, run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Dist,
                 keep: str) -> None:
        self.run, self.model, self.optimizer, self.dist, self.keep = run, model, optimizer, dist, keep
        self._warned = False
        self.sharded = is_sharded(model)

    def _holds_best(self, record: dict) -> bool:
        return self.keep != "last" and "best" in record

    def save(self, record: dict) -> None:
        """state/ for the current step; the model directory too, unless it holds the best step."""
        full = write_shards(self.run.out, self.model, self.optimizer, self.dist) if self.sharded else None
        self.dist.on_main(self._write, record, full)  # a failed write stops every rank, not only rank 0
        record["last_saved_step"] = record["step"]

    def _write(self, record: dict, full: dict | None) -> None:
        weights = save_state(self.run.out, self.model, self.optimizer, record, full)
        if not self._holds_best(record):
            self.run.save_model(self.run.out, weights, checkpoint={"step": record["step"], "keep": "last"})
        with contextlib.suppress(Exception):  # a plot is never worth losing a checkpoint over
            plot_metrics(self.run.out / "metrics.jsonl", self.run.out / "loss.png", self.run.title)

    def evaluated(self, metrics: dict, record: dict) -> None:
        """After an evaluation (every rank has its metrics): a new lowest val_loss goes to the model
        directory now. Every rank updates record["best"] alike; rank 0 writes."""
        if self.keep == "last":
            return
        loss = metrics.get("val_loss")
        if loss is None:
            if self.keep == "best" and not self._warned and self.dist.main:
                tqdm.write("warning: --keep best, but there is no validation loss: the model directory keeps "
                           "the last step", file=sys.stderr)
                self._warned = True
            return
        if "best" in record and loss >= record["best"]["val_loss"]:
            return
        record["best"] = {"step": record["step"], "val_loss": loss}
        full = full_weights(self.model, self.dist) if self.sharded else None
        self.dist.on_main(self._write_best, full, {**record["best"], "keep": "best"})

    def _write_best(self, full: dict | None, checkpoint: dict) -> None:
        if full is None:
            self.run.save_model(self.run.out, None, checkpoint=checkpoint)
            return
        gathered = self.run.out / "best.safetensors.tmp"  # linked in as model.safetensors, then unlinked
        save_weights(full, gathered)
        self.run.save_model(self.run.out, gathered, checkpoint=checkpoint)
        gathered.unlink()

    def model_step(self, record: dict) -> int:
        """The step whose weights the model directory holds."""
        return record["best"]["step"] if self._holds_best(record) else record["step"]
