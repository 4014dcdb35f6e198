"""Settings of the alignment verbs (`lmforge align reward|dpo|rlhf`). Torch-free, like `config.py`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import arg
from .config import FinetuneConfig, lr_help

TEMPLATES = ["auto", "alpaca", "chatml", "model"]


@dataclass
class PreferenceConfig(FinetuneConfig):
    """Preference data and prompt format (shared by the reward model and DPO)"""

    data: str = arg(None, "preference records, JSONL: {prompt|messages, chosen, rejected[, margin]} or "
                    "{prompt|messages, responses: [best, ..., worst][, ranks]}")
    val: str | None = arg(None, "validation records in the same format (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.1, "share of records held out for validation when --val is not given", ge=0, lt=1)
    template: str = arg("auto", "prompt format, as in instruction tuning: auto (the model's own chat_template, else "
                        "chatml if the tokenizer has its tokens, else alpaca), alpaca, chatml, or model",
                        choices=TEMPLATES)
    batch_size: int = arg(8, "prompts per micro-batch, per process (all answers of a prompt go together)", ge=1)


@dataclass
class RewardConfig(PreferenceConfig):
    """Reward model: a scalar head on the last token, trained on which answer people preferred
    (Bradley-Terry: -log sigmoid(r_better - r_worse - margin); every pair of a ranked prompt in one
    batch element, one forward pass per answer, as InstructGPT does)"""

    center_rewards: float = arg(0.0, "weight of a term pulling rewards towards 0 (mean of (r_better + r_worse)^2; "
                                "TRL's center_rewards_coefficient, e.g. 0.01)", ge=0)
    lr: float | None = arg(None, lr_help("reward"), gt=0)


@dataclass
class DPOConfig(PreferenceConfig):
    """Direct preference optimisation: move the policy toward preferred answers relative to the frozen
    starting model (reference log-probabilities are computed once, before training)"""

    beta: float = arg(0.1, "strength of the pull toward the reference (higher: stay closer)", gt=0)
    loss: str = arg("sigmoid", "sigmoid (DPO), ipo (squared loss on length-averaged log-ratios) or hinge (SLiC)",
                    choices=["sigmoid", "ipo", "hinge"])
    lr: float | None = arg(None, lr_help("dpo"), gt=0)


@dataclass
class RLHFConfig(FinetuneConfig):
    """RLHF: sample answers to prompts, score them with a reward model or a function, and push the
    policy toward higher reward while a KL penalty keeps it near the starting model"""

    reward: str | None = arg(None, "reward model directory (from lmforge align reward)")
    reward_fn: str | None = arg(None, "instead of a reward model: module:function(prompt, completion) -> float "
                                "(a verifier); the module is imported from the current directory or sys.path")
    prompts: str = arg(None, "prompts, JSONL: {prompt} or {messages: [...]} per line")
    template: str = arg("auto", "prompt format (as in instruction tuning)", choices=TEMPLATES)
    algo: str = arg("grpo", "grpo (group-relative advantages, no value model) or ppo (a value head, GAE, the KL "
                    "penalty folded into per-token rewards: InstructGPT)", choices=["grpo", "ppo"])
    group_size: int = arg(4, "completions sampled per prompt (GRPO's G: advantages compare them)", ge=1)
    batch_size: int = arg(4, "prompts per micro-batch, per process", ge=1)
    max_new_tokens: int = arg(32, "longest completion, in tokens", ge=1)
    temperature: float = arg(1.0, "sampling temperature of the rollouts. The group's answers must be well formed for "
                             "the reward to tell them apart: if a small policy's samples read as garbage (check with "
                             "`lmforge generate --temperature T`), lower it (0.6-0.8)", gt=0)
    scale_rewards: str = arg("none", "advantages: none (reward minus the group's mean: Dr. GRPO, the default) or "
                             "group (also divided by the group's std: GRPO as published; turns near-equal rewards' "
                             "noise into full-size advantages)", choices=["none", "group"])
    kl_coef: float = arg(0.04, "weight of the KL penalty to the starting model (k3 estimator per token)", ge=0)
    kl_target: float | None = arg(0.1, "mean per-token KL above which the penalty's weight grows in proportion "
                                  "(kl_coef x KL / target); 0 = a fixed weight", ge=0)
    max_kl: float | None = arg(1.0, "a batch whose mean per-token KL to the starting model passes this trains on the "
                               "KL penalty alone, pulling the policy back; 0 = no limit", ge=0)
    clip: float = arg(0.2, "PPO/GRPO ratio clipping epsilon", gt=0, lt=1)
    gamma: float = arg(1.0, "ppo: discount", ge=0, le=1)
    lam: float = arg(0.95, "ppo: GAE lambda", ge=0, le=1)
    value_clip: float = arg(0.2, "ppo: values move at most this far from the rollout's (value clipping)", gt=0)
    vf_coef: float = arg(0.1, "ppo: weight of the value loss", ge=0)
    slots: int = arg(16, "engine slots for the rollouts (sequences decoded together)", ge=1)
    lr: float | None = arg(None, lr_help("rlhf"), gt=0)
    eval_every: int = arg(20, "evaluate every N steps (and at the end)", ge=1)
    log_every: int = arg(1, "log a metrics row every N steps", ge=1)
