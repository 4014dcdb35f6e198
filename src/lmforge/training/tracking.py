"""TensorBoard event files of a run (RUN/tb/), written from the same rows as metrics.jsonl.

Every number of a row becomes a scalar under its metrics.jsonl name (so `loss`, `lr`, `val_bpb`,
`rewards/margins` read the same in both), nested dicts are flattened with `/` (a classifier's
`val_per_class/spam/f1`), lists are left out (the confusion matrix), and `val_samples` becomes text.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import LMForgeError

TB_DIR = "tb"
_EVENT_TIME = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def scalars(row: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number of a metrics row but its step."""
    for key, value in row.items():
        if isinstance(value, bool) or (key == "step" and not prefix):
            continue
        if isinstance(value, (int, float)):
            yield prefix + key, float(value)
        elif isinstance(value, dict):
            yield from scalars(value, f"{prefix}{key}/")


def samples_markdown(samples: list[dict]) -> str:
    """The validation samples as TensorBoard text (Markdown): each prompt and response in an
    indented code block, so a model's output shows verbatim and never as markup."""
    parts = []
    for i, s in enumerate(samples, 1):
        for name in ("prompt", "response"):
            text = str(s.get(name, ""))
            parts.append(f"**{i}. {name}**\n\n" + "\n".join("    " + line for line in text.splitlines() or [""]))
    return "\n\n".join(parts)


class Board:
    """One run's event files. Call on the main process only (under torchrun, rank 0 writes)."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.writer = directory, None

    def start(self, resumed_step: int | None, kept: list[dict]) -> None:
        """A fresh run starts without event files. A resumed one opens a new file whose purge_step
        (resumed_step + 1) makes TensorBoard drop what earlier files logged after the checkpoint,
        since those steps run, and are logged, again: each step shows once. A resumed run without
        event files (it ran with --no-tensorboard) first gets the rows it kept (`kept`)."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package: slow, so here
        except ImportError:  # an environment installed before tensorboard became a dependency
            raise LMForgeError("TensorBoard event files need the tensorboard package: pip install tensorboard, "
                               "or train with --no-tensorboard") from None

        if resumed_step is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        earlier = [int(m.group(1)) for p in self.dir.glob("events.out.tfevents.*")
                   if (m := _EVENT_TIME.match(p.name))]
        # readers take a directory's files in name order, which starts with the creation second:
        # a run resumed within the second its last file was opened waits, so the new file sorts last
        wait = max(earlier, default=0) + 1 - time.time()
        if 0 < wait <= 1:  # (a later time, from a clock set back, is not waited for)
            time.sleep(wait)
        self.writer = SummaryWriter(str(self.dir), purge_step=None if resumed_step is None else resumed_step + 1)
        if resumed_step is not None and not earlier:
            for row in kept:
                self.write(row, flush=False)
            self.writer.flush()

    def write(self, row: dict, flush: bool = True) -> None:
        """One metrics row at its step; flushed at once, as metrics.jsonl is, so a killed run loses
        no row that metrics.jsonl kept."""
        if self.writer is None:
            return
        step = int(row["step"])
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, step)
        if row.get("val_samples"):
            self.writer.add_text("val_samples", samples_markdown(row["val_samples"]), step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
