"""`TrainConfig`: the loop's settings, shared by pretraining, fine-tuning and alignment."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import arg


@dataclass
class TrainConfig:
    """Training loop: batch, optimiser, schedule, budget, checkpoints (shared by pretrain and finetune)"""

    batch_size: int = arg(8, "sequences per micro-batch, per process")
    grad_accum: int = arg(1, "micro-batches accumulated into one optimizer step")
    lr: float | None = arg(None, "peak learning rate (default: chosen from the model width)")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak")
    schedule: str = arg("cosine", "learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) "
                        "or constant", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = arg(50, "steps of linear warmup (capped at 10%% of --max-steps)")
    decay_fraction: float = arg(0.2, "wsd: fraction of the run spent decaying at the end")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only; not biases or norms)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)")
    max_steps: int | None = arg(None, "stop after this many optimizer steps")
    max_tokens: int | None = arg(None, "stop after training on this many tokens")
    max_minutes: float | None = arg(None, "stop after this many minutes of training")
    epochs: float | None = arg(None, "stop after this many passes over the training data")
    eval_every: int = arg(100, "evaluate on the validation data every N steps (and at the end)")
    eval_batches: int = arg(20, "validation batches per evaluation")
    save_every: int = arg(500, "write a checkpoint every N steps (and at the end, and on Ctrl-C)")
    log_every: int = arg(10, "log a metrics row every N steps")
    seed: int = arg(1337, "random seed (weights init, data order, dropout, sampling)")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps, or auto")
    compile: bool = arg(False, "compile the model with torch.compile (faster steps, slower start)")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint, exactly")
    overwrite: bool = arg(False, "replace an existing model directory at --out")

