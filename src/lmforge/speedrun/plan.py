"""Presets and the time budget: which model, how much data, and how many steps each stage gets.

The rule: each training stage gets a fixed share of --minutes (SHARES), turned into a number of
optimizer steps by a throughput probe (`models.sizing.measure_step_seconds` at the stage's batch
shape) run once, at the start. The steps are saved in plan.json, so the results depend on steps,
not on how busy the machine is later, and a resumed run keeps them. What is left (tokenizer, data,
evaluation, the RAG index) is not budgeted: it is measured, and the report shows it. The `tiny`
preset (for tests) skips the probe and fixes the steps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json

SHARES = {"pretrain": 0.55, "sft": 0.15, "dpo": 0.10}  # the other 20%: tokenizer, data, evaluation, RAG
MIN_STEPS = {"pretrain": 100, "sft": 40, "dpo": 20}  # fewer and a stage learns nothing worth reporting
STAGES = ["data", "tokenizer", "pretrain", "sft", "dpo", "eval", "rag"]
MODELS = {"base": "pretrain", "sft": "sft", "aligned": "dpo"}  # model directory: the stage that writes it
CHAT_LENGTH = 256  # tokens: the chat and preference records are one question and a short answer
# what a batch of them pads to, about (system prompt, question, an answer of up to 240 characters): the probe
# times this, not CHAT_LENGTH, which made SFT finish its steps in an eighth of its share
CHAT_PROBE_LENGTH = 128


@dataclass
class Preset:
    """Everything a preset fixes. `steps` set: no probe (the tiny test preset)."""

    name: str
    depth: int  # layers; width 64 x depth (models.sizing)
    vocab: int
    context: int  # long enough for a `rag ask` prompt with 3 sources
    batch: int
    chat_batch: int
    compile: bool = False
    docs: int | None = None  # corpus documents used (None: all)
    sft_records: int = 3000
    pref_pairs: int = 600
    eval_questions: int = 60
    eval_limit: int = 100  # documents per built-in eval task
    rag_docs: int = 600  # corpus documents indexed
    rag_chunk: int = 200  # encoder tokens per chunk: 3 sources and the question fit the context
    samples: int = 4  # sample conversations and RAG answers in the report
    steps: dict | None = None
    device: str = "auto"


PRESETS = {
    "cpu": Preset("cpu", depth=3, vocab=4096, context=1024, batch=4, chat_batch=8),
    # depth 12 (768 wide) in bf16 with torch.compile: the loop autocasts to bf16 on CUDA
    "gpu": Preset("gpu", depth=12, vocab=8192, context=1024, batch=32, chat_batch=32, compile=True,
                  sft_records=8000, pref_pairs=2000, eval_questions=100, eval_limit=200, rag_docs=5000),
    # for tests: seconds per stage; the steps are fixed, so two runs give the same figures
    "tiny": Preset("tiny", depth=1, vocab=512, context=1024, batch=2, chat_batch=4, docs=400, sft_records=120,
                   pref_pairs=40, eval_questions=8, eval_limit=8, rag_docs=30, rag_chunk=80, samples=2,
                   steps={"pretrain": 30, "sft": 30, "dpo": 12}),
}


@dataclass
class Plan:
    """What the run will do, saved as plan.json before any stage runs."""

    preset: Preset
    minutes: float
    data: list[str]
    seed: int
    steps: dict
    step_seconds: dict  # the probe's seconds per step, per training stage (empty for fixed steps)
    rule: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(**{**d, "preset": Preset(**d["preset"])})


def stage_steps(preset: Preset, minutes: float, probe: Callable[[int, int], float]) -> tuple[dict, dict]:
    """(steps, seconds per step) per training stage. `probe(batch, length)` -> seconds per step.
    Too few minutes for MIN_STEPS in any stage: a one-line error naming the minimum."""
    shapes = {"pretrain": (preset.batch, preset.context), "sft": (preset.chat_batch, CHAT_PROBE_LENGTH),
              "dpo": (2 * preset.chat_batch, CHAT_PROBE_LENGTH)}  # DPO: a chosen and a rejected answer per pair
    seconds = {stage: probe(*shape) for stage, shape in shapes.items()}
    # each stage needs MIN_STEPS within its share, and the shares are 80% of the whole
    need = max(MIN_STEPS[s] * seconds[s] / SHARES[s] for s in SHARES) / 60
    if minutes < need:
        raise LMForgeError(f"--minutes {minutes:g} is too small for the {preset.name} preset's stages on this "
                           f"machine: the minimum is {need:.1f} (each training stage needs its minimum steps, "
                           f"{', '.join(f'{s} {n}' for s, n in MIN_STEPS.items())})")
    steps = {s: int(SHARES[s] * minutes * 60 / seconds[s]) for s in SHARES}
    return steps, {s: round(v, 4) for s, v in seconds.items()}


def load_or_make_plan(out: Path, preset: Preset, minutes: float, data: list[str], seed: int,
                      probe: Callable[[int, int], float]) -> tuple[Plan, bool]:
    """(the plan, whether it was read back): a run directory's plan.json is kept, so a resumed run
    uses the steps it began with; a different preset or --data there is an error."""
    file = out / "plan.json"
    if file.exists():
        plan = Plan.from_json(json.loads(file.read_text()))
        if plan.preset.name != preset.name or plan.data != data or plan.seed != seed:
            raise LMForgeError(f"{out} holds a speedrun with other settings (preset {plan.preset.name}, data "
                               f"{plan.data or 'none'}, seed {plan.seed}); choose another --out to start afresh")
        return plan, True
    if preset.steps:
        steps, seconds = dict(preset.steps), {}
    else:
        steps, seconds = stage_steps(preset, minutes, probe)
    rule = ("fixed steps (test preset)" if preset.steps else
            "each training stage gets a share of --minutes ("
            + ", ".join(f"{s} {int(v * 100)}%" for s, v in SHARES.items())
            + "; tokenizer, data, evaluation and RAG take the rest), turned into optimizer steps by a "
              "throughput probe at the stage's batch shape, run once at the start")
    plan = Plan(preset, minutes, data, seed, steps, seconds, rule)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(file, plan.to_json())
    return plan, False
