"""The verbs `speedrun` and `report`: their flags and their calls into `lmforge.speedrun`.

Torch-free until a verb runs, so `--help` answers at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from .args import device_flag


@dataclass
class SpeedrunArgs:
    """Raw text to a chat model you can talk to, in one command: a tokenizer, base pretraining on
    Python's documentation (plus --data), chat tuning, DPO on a measurable preference, evaluation of
    all three models, a RAG index, and DIR/report.md. Rerun the same command to resume: finished
    stages are skipped, an interrupted one continues from its last checkpoint."""

    out: str = arg("runs/speedrun", "run directory (rerun with the same one to resume)")
    minutes: float = arg(30.0, "time budget: each training stage gets a fixed share, turned into steps by a "
                         "throughput probe at the start (see report.md)", gt=0)
    data: list[str] = arg([], "more training text besides pydocs: files, directories, .jsonl")
    preset: str = arg("cpu", "cpu: a 3-layer model, ~30 minutes on a laptop CPU; gpu: 12 layers, bf16 and "
                      "torch.compile, for one GPU; tiny: seconds per stage with fixed steps (for tests)",
                      choices=["cpu", "gpu", "tiny"])
    judge: str | None = arg(None, "also grade the held-out answers with the chat model behind this "
                            "OpenAI-compatible URL (1-10)")
    seed: int = arg(1337, "random seed")
    device: str = device_flag()


@dataclass
class ReportArgs:
    """Rebuild a speedrun's report.md from its run directory alone."""

    dir: str = arg(None, "speedrun directory", positional=True)


def speedrun(ns) -> None:
    a = from_namespace(SpeedrunArgs, ns)
    from ..speedrun.plan import PRESETS
    from ..speedrun.stages import speedrun as run

    report = run(a.out, dataclasses.replace(PRESETS[a.preset], device=a.device), a.minutes, a.data, a.seed, a.judge)
    out = report.parent
    print(f"report card:  {report}\ntalk to it:   lmforge chat {out / 'aligned'}\n"
          f"serve it:     lmforge serve {out / 'aligned'}\n"
          f"ask the docs: lmforge rag ask {out / 'index'} \"What does json.dumps do?\" --model {out / 'aligned'} -k 3")


def report(ns) -> None:
    a = from_namespace(ReportArgs, ns)
    from ..speedrun.report import write_report

    print(write_report(a.dir))
