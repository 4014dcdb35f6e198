"""One model's report-card figures: bits per byte on held-out text, the built-in eval tasks zero-
and few-shot, its answers to the held-out questions (scored automatically, and by a judge when one
is given), and a few sample conversations. Every model is asked in the chat format it was tuned
with (the base model too, so the three answer the same prompts)."""

from __future__ import annotations

from pathlib import Path

from ..eval.evaluate import evaluate_text
from ..eval.harness import run_task
from ..eval.tasks import load_task
from ..formats.load import load_model
from ..text.templates import get_template
from ..training.tasks.instruct import answer_loss, encode_conversations, respond
from . import data as sd
from .data import read_jsonl
from .plan import CHAT_LENGTH, Plan

MAX_ANSWER_TOKENS = 80
SHOTS = (0, 3)
TASKS = ("arithmetic", "pydocs", "spam")
SMALL_TALK_PROMPTS = ["Who are you?", "Hello!"]


def evaluate_model(model_dir: Path, data_dir: Path, plan: Plan, judge: str | None = None) -> dict:
    lm = load_model(model_dir, plan.preset.device, quantize=None)
    figures: dict = {"bits_per_byte": round(evaluate_text(lm, [str(data_dir / "val.jsonl")])["bits_per_byte"], 4)}
    for name in TASKS:
        task = load_task(name)[0]
        for shots in SHOTS:
            result, _ = run_task(task, lm, shots=shots, seed=plan.seed, limit=plan.preset.eval_limit)
            figures[f"{name} {shots}-shot"] = round(result["acc_norm" if task.kind == "choice" else "exact_match"], 4)
    template = get_template("auto", lm.tokenizer)  # what instruction tuning picked for this tokenizer
    held = read_jsonl(data_dir / "eval.jsonl")
    convs = [sd.conversation(r["question"], r["reference"])["messages"] for r in held]
    answers = [respond(lm.model, lm.tokenizer, template, c, MAX_ANSWER_TOKENS).strip() for c in convs]
    examples, _ = encode_conversations(convs, lm.tokenizer, template, CHAT_LENGTH + 1)
    figures["held-out answer loss"] = round(answer_loss(lm.model, examples, lm.tokenizer.pad_id), 4)
    figures["held-out word F1"] = round(sum(
        sd.word_f1(sd.without_rule(a), r["reference"]) for a, r in zip(answers, held)) / len(held), 4)
    figures["rule followed"] = round(sum(map(sd.follows_rule, answers)) / len(held), 4)
    rows = [{"question": r["question"], "answer": a, "reference": r["reference"]} for r, a in zip(held, answers)]
    if judge:
        from ..eval.judge import judge_single
        from ..inference.client import RemoteGenerator

        scores = [r["score"] for r in judge_single(RemoteGenerator(judge), rows) if r["score"] is not None]
        figures["judge score (1-10)"] = round(sum(scores) / len(scores), 2) if scores else None
    talk = [{"question": q, "answer": respond(lm.model, lm.tokenizer, template,
                                              sd.conversation(q, "")["messages"], MAX_ANSWER_TOKENS).strip()}
            for q in SMALL_TALK_PROMPTS]
    return {"figures": figures, "samples": rows[:plan.preset.samples] + talk, "answers": rows}
