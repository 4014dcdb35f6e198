"""The alignment verbs: `align reward|dpo|rlhf`, `score` and `rank`. Torch-free at import (the
work is imported inside each function), so `--help` answers at once."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from ..core.errors import LMForgeError
from ..training.align_config import DPOConfig, RewardConfig, RLHFConfig
from .verbs import print_summary, read_text_arg


@dataclass
class ScoreArgs:
    """Score an answer to a prompt with a reward model (higher = preferred)"""

    model_dir: str = arg(None, "reward model directory (from lmforge align reward)", positional=True)
    prompt: str | None = arg(None, "the prompt (- reads stdin)", short="-p")
    response: str | None = arg(None, "the answer to score", short="-r")
    system: str | None = arg(None, "a system message before the prompt")
    json: bool = arg(False, "print {\"reward\": ...} as JSON")
    device: str = arg("auto", "cpu, cuda, mps, or auto")


def reward(ns) -> None:
    cfg = from_namespace(RewardConfig, ns)

    from ..training.tasks.reward import train_reward

    print_summary(train_reward(cfg), ("step", "loss", "accuracy", "val_loss", "val_accuracy", "val_margin"))


def dpo(ns) -> None:
    cfg = from_namespace(DPOConfig, ns)

    from ..training.tasks.dpo import train_dpo

    print_summary(train_dpo(cfg), ("step", "loss", "rewards/accuracies", "rewards/margins", "val_loss",
                                   "val_rewards/accuracies"))


def rlhf(ns) -> None:
    cfg = from_namespace(RLHFConfig, ns)

    from ..training.tasks.rlhf import train_rlhf

    print_summary(train_rlhf(cfg), ("step", "loss", "reward", "kl", "val_reward"))


def score(ns) -> None:
    a = from_namespace(ScoreArgs, ns)

    from ..api import load

    prompt = read_text_arg(a.prompt, "prompt")
    response = read_text_arg(a.response, "response")
    value = load(a.model_dir, device=a.device).score(prompt, response, a.system)
    print(json.dumps({"reward": value}) if a.json else f"{value:.4f}")


@dataclass
class RankArgs:
    """Rank sampled answers at the terminal: you are the human in the loop. For each prompt, K answers
    are sampled (seeds seed, seed+1, ...) and shown numbered; type their order, best first (e.g. `2 1 3`;
    `2 = 1 3` ties 2 and 1), `s` to skip the prompt or `q` (or Ctrl-D) to stop. Each ranking is appended
    to --out at once, and a later run resumes after the last prompt ranked there."""

    model_dir: str = arg(None, "the model that answers (an instruction-tuned model directory)", positional=True)
    prompts: str = arg(None, "prompts, JSONL: {prompt} or {messages: [...]} per line")
    out: str = arg(None, "preference file to append to (JSONL, the format align reward / dpo read)")
    k: int = arg(2, "answers per prompt", short="-k", ge=2, le=4)
    max_new_tokens: int = arg(64, "longest answer, in tokens", ge=1)
    temperature: float = arg(0.8, "sampling temperature", gt=0)
    top_p: float | None = arg(None, "nucleus sampling: keep the smallest set of tokens with this much probability",
                              gt=0, le=1)
    seed: int = arg(0, "seed of the first answer of the first prompt (each answer has its own seed)")
    device: str = arg("auto", "cpu, cuda, mps, or auto")


def rank(ns) -> None:
    a = from_namespace(RankArgs, ns)

    from ..inference.rank import rank_session

    for name in ("prompts", "out"):
        if not getattr(a, name):
            raise LMForgeError(f"--{name} is required")
    rank_session(a.model_dir, a.prompts, a.out, a.k, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.device)
