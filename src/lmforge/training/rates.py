"""Default peak learning rates: from the model's width and the method, for every trainer.

Pretraining: 2e-3 x sqrt(256 / width) for AdamW (5e-4 x ... for BERT's post-norm layout), tuned on
this machine's time-to-quality runs (BENCHMARKS.md).

Fine-tuning and alignment: the rate at width 768 for the method, scaled by 768 / width. The 1/width
rule is muP's for hidden matrices trained with Adam (Yang et al. 2022, "Tensor Programs V"): a
narrow model needs, and bears, larger steps. The width-768 rates were chosen on the README's
64-wide walkthroughs (where they give 12x these figures); at width 4096 (7B models) they land
within 1.5-5x of the published recipes, on the high side, since those runs are thousands of steps
long: SFT 2e-5 (Alpaca, Tulu 2), reward model 9e-6 (InstructGPT), DPO 5e-7 to 1e-6 (Zephyr, TRL),
GRPO 1e-6 (DeepSeekMath, TRL).

Full fine-tuning never steps harder than pretraining did at that width. LoRA adapters and fresh
heads start from nothing and take 10x the full rate (as QLoRA's 2e-4 against full fine-tuning's
2e-5 at 7B), up to 1e-2: the most the README's 64-wide LoRA runs were stable at.
"""

from __future__ import annotations

import math

# Full fine-tuning, AdamW, at width 768.
AT_768 = {"classify": 1e-4, "instruct": 2.5e-4, "seq2seq": 1e-4, "reward": 8e-5, "dpo": 8e-6, "rlhf": 2.5e-5}
ADAPTER_FACTOR, ADAPTER_MAX = 10.0, 1e-2
POST_NORM = ("bert", "bart")  # the families with post-norm blocks: smaller steps


def pretrain_lr(n_embd: int, arch: str = "gpt2") -> float:
    """Peak AdamW learning rate of pretraining: narrower models tolerate (and need) larger steps;
    BERT's (and BART's) post-norm layout wants smaller ones (in trials at width 64, 1e-3 beat 3e-3 for masked-token
    prediction)."""
    return round((5e-4 if arch in POST_NORM else 2e-3) * math.sqrt(256 / n_embd), 6)


def finetune_lr(method: str, n_embd: int, adapter: bool = False, arch: str = "gpt2") -> float:
    """Peak learning rate of fine-tuning `method` (a key of AT_768) at this width; `adapter`: LoRA
    or a fresh head only (the rest frozen)."""
    lr = AT_768[method] * 768 / n_embd
    lr = min(lr * ADAPTER_FACTOR, ADAPTER_MAX) if adapter else min(lr, pretrain_lr(n_embd, arch))
    return float(f"{lr:.2g}")


def describe(method: str, n_embd: int, adapter: bool) -> str:
    """How the default was reached, for the log line."""
    cap = f"at most {ADAPTER_MAX:g}" if adapter else "at most pretraining's"
    return (f"default for {method}{' (LoRA/head)' if adapter else ''} at width {n_embd}: "
            f"{AT_768[method]:g} x 768/{n_embd}{' x 10' if adapter else ''}, {cap}")
