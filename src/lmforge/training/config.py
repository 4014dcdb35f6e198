"""`TrainConfig`: the loop's settings, shared by pretraining, fine-tuning and alignment."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import arg


@dataclass
class TrainConfig:
    """Training loop: batch, optimiser, schedule, budget, checkpoints (shared by pretrain and finetune)"""

    batch_size: int = arg(8, "sequences per micro-batch, per process", ge=1)
    grad_accum: int = arg(1, "micro-batches accumulated into one optimizer step", ge=1)
    lr: float | None = arg(None, "peak learning rate (default: chosen from the model width)", gt=0)
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)
    schedule: str = arg("cosine", "learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) "
                        "or constant", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = arg(50, "steps of linear warmup (it ends sooner, at 10%% of the budget, in short runs)", ge=0)
    decay_fraction: float = arg(0.2, "wsd: fraction of the run spent decaying at the end", ge=0, le=1)
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only; not biases or norms)", ge=0)
    beta1: float = arg(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = arg(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)", ge=0)
    max_steps: int | None = arg(None, "stop after this many optimizer steps", ge=1)
    max_tokens: int | None = arg(None, "stop after training on this many tokens", ge=1)
    max_minutes: float | None = arg(None, "stop after this many minutes of training", gt=0)
    epochs: float | None = arg(None, "stop after this many passes over the training data", gt=0)
    eval_every: int = arg(100, "evaluate on the validation data every N steps (and at the end)", ge=1)
    eval_batches: int = arg(20, "validation batches per evaluation", ge=1)
    save_every: int = arg(500, "write a checkpoint every N steps (and at the end, and on Ctrl-C)", ge=0)
    keep: str = arg("auto", "weights in the model directory: best (the lowest validation loss so far), last (the "
                    "last step's), or auto (best when there is validation data); state/ always holds the last "
                    "step, for --resume", choices=["auto", "best", "last"])
    log_every: int = arg(10, "log a metrics row every N steps", ge=1)
    seed: int = arg(1337, "random seed (weights init, data order, dropout, sampling)")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps, or auto")
    compile: bool = arg(False, "compile the model with torch.compile (faster steps, slower start)")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint, exactly. Without a budget flag "
                       "it keeps the run's budget; with a different one, the rest of the LR schedule is stretched "
                       "or squeezed from where the run stands to end with the new budget")
    overwrite: bool = arg(False, "replace an existing model directory at --out")

