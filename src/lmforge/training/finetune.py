"""What classification and instruction fine-tuning share: the base model, LoRA, saving, resume."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import arg
from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json
from ..core.runtime import Dist
from ..formats.hf_dir import copy_side_files
from ..formats.load import builtin_model, load_parts
from ..formats.modeldir import model_config_json, save_model_dir, save_weights
from ..models.lora import adapter_state, apply_lora, count_parameters, freeze_for_lora
from ..text.tokenizer import Tokenizer
from .config import TrainConfig
from .rundir import check_out, resume_config
from .schedule import BUDGETS, check_budget


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning: base model, output, LoRA"""

    base: str = arg(None, "base model: an lmforge model directory or a Hugging Face checkpoint directory",
                    positional=True)
    out: str = arg(None, "model directory to write")
    context_length: int | None = arg(None, "longest sequence in tokens (default: the base model's context)", ge=1)
    lora_rank: int = arg(0, "LoRA rank; 0 = full fine-tuning of every (unfrozen) weight", ge=0)
    lora_alpha: float = arg(16.0, "LoRA scaling numerator: updates are scaled by alpha / rank", gt=0)
    lora_dropout: float = arg(0.0, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list[str] = arg(["attn"], "layers to adapt: attn (= attn.qkv attn.proj), mlp (= mlp.fc mlp.proj), "
                                  "all, lm_head, or any layer-name suffix")
    epochs: float | None = arg(None, "passes over the training data (default: 3, when no other budget is given)", gt=0)
    eval_every: int = arg(50, "evaluate every N steps (and at the end)", ge=1)
    save_every: int = arg(200, "write a checkpoint every N steps (and at the end, and on Ctrl-C)", ge=0)
    log_every: int = arg(5, "log a metrics row every N steps", ge=1)
    warmup_steps: int = arg(20, "steps of linear warmup (it ends sooner, at 10%% of the budget, in short runs)", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)", ge=0)


def default_lr(cfg: FinetuneConfig, head_only: bool = False) -> float:
    """Adapters and fresh heads take larger steps than a pretrained body can bear."""
    return cfg.lr or (1e-3 if cfg.lora_rank or head_only else 1e-4)


def prepare(cfg: FinetuneConfig, dist: Dist, kinds: tuple[str, ...] = ("causal-lm",)):
    """Check --out / --resume and the budget, and load the base model in fp32. Returns (cfg,
    model, tokenizer, base path)."""
    if not cfg.base:
        raise LMForgeError("missing required argument BASE (the model to fine-tune)")
    if not cfg.out:
        raise LMForgeError("--out is required")
    out = Path(cfg.out)
    if cfg.resume:
        cfg = resume_config(cfg, out)
    else:
        dist.on_main(check_out, out, cfg.overwrite)  # rank 0 alone looks: it alone will write there
    if all(getattr(cfg, b) is None for b in BUDGETS):
        cfg.epochs = 3.0
    check_budget(cfg)
    base = builtin_model(cfg.base) or Path(cfg.base).expanduser()
    if (base / "adapter.safetensors").exists():
        raise LMForgeError(f"{base} is a LoRA adapter: merge it first (lmforge merge-lora {base} --out DIR)")
    model, tokenizer, meta = load_parts(base)
    if meta.get("kind", "causal-lm") not in kinds:
        raise LMForgeError(f"{base} is a {meta['kind']}; this fine-tuning needs a {' or '.join(kinds)} base")
    model = model.float()  # train in fp32 (AdamW state and small updates need the precision)
    cfg.context_length = min(cfg.context_length or model.cfg.context_length, model.cfg.context_length)
    return cfg, model, tokenizer, base


def setup_lora(model: torch.nn.Module, cfg: FinetuneConfig, train_also: tuple[str, ...] = ()) -> dict | None:
    """Wrap the target layers with adapters and freeze the rest; returns the adapter description."""
    if not cfg.lora_rank:
        return None
    layers = apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    freeze_for_lora(model, train_also)
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "layers": layers}


def report_parameters(model: torch.nn.Module, dist: Dist) -> None:
    trainable, total = count_parameters(model)
    dist.say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")


def make_saver(model: torch.nn.Module, tokenizer: Tokenizer, base: Path, lora: dict | None,
               train_also: tuple[str, ...] = (), **meta):
    """The `Run.save_model` callback: a full model directory, or an adapter directory (the LoRA
    weights plus any trained head, in a small file, and a reference to the base model)."""
    base = base.expanduser().resolve()

    def save(directory: Path, weights_file: Path | None, **extra) -> None:
        copy_side_files(base, directory)  # chat template, special tokens, generation defaults
        if lora is None:
            save_model_dir(directory, model, tokenizer, weights_file, **meta, **extra)
            return
        save_weights(adapter_state(model, train_also), directory / "adapter.safetensors")
        tokenizer.save(directory / "tokenizer.json")
        atomic_write_json(directory / "config.json", model_config_json(
            model, tokenizer, **meta, **extra, lora=lora, base_model=str(base),
            base_model_relative=os.path.relpath(base, directory.resolve())))

    return save


