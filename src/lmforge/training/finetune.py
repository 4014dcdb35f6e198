"""What classification and instruction fine-tuning share: the base model, LoRA, saving, resume."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json
from ..core.runtime import Dist, distributed
from ..formats.hf_dir import copy_side_files
from ..formats.kinds import Kind, kind_of
from ..formats.load import builtin_model, load_parts
from ..formats.modeldir import model_config_json, read_config, save_model_dir, save_weights
from ..models.lora import adapter_state, apply_lora, count_parameters, freeze_for_lora
from ..text.templates import Template, get_template
from ..text.tokenizer import Tokenizer
from .align_config import PreferenceConfig
from .config import FinetuneConfig, InstructConfig
from .rates import describe, finetune_lr
from .rundir import check_out, resume_config
from .schedule import BUDGETS, check_budget


def default_lr(cfg: FinetuneConfig, method: str, model: torch.nn.Module, dist: Dist, head_only: bool = False) -> float:
    """--lr, or the default for `method` at the model's width (`rates.finetune_lr`), said aloud."""
    if cfg.lr:
        return cfg.lr
    mcfg = model.cfg
    adapter = bool(cfg.lora_rank) or head_only
    lr = finetune_lr(method, mcfg.n_embd, adapter, "bert" if mcfg.norm_position == "post" else "gpt2")
    dist.say(f"lr {lr:g} ({describe(method, mcfg.n_embd, adapter)}; set --lr to choose)")
    return lr


def run_distributed(body: Callable[[FinetuneConfig, tuple[Dist, torch.device], Callable | None], dict],
                    cfg: FinetuneConfig, on_step: Callable | None) -> dict:
    """`body(cfg, (dist, device), on_step)` on each rank under torchrun (alone: once), the ranks but
    the first quiet: how every fine-tuning and alignment task runs."""
    with distributed(cfg.device) as ddp, ddp[0].quiet():
        return body(cfg, ddp, on_step)


def prepare(cfg: FinetuneConfig, dist: Dist, kinds: tuple[Kind, ...] = (Kind.CAUSAL_LM,), need: str | None = None):
    """Check --out / --resume and the budget, and load the base model in fp32. Returns (cfg,
    model, tokenizer, base path). A base of another kind is a one-line error: `need` says what
    this fine-tuning needs (default: one of `kinds`)."""
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
    adapter = (base / "adapter.safetensors").exists()
    model, tokenizer, meta = (None, None, read_config(base)) if adapter else load_parts(base)
    if kind_of(meta) not in kinds:  # before the adapter's advice: merging would not make it a fitting base
        need = need or f"this fine-tuning needs a {' or '.join(map(str, kinds))}"
        raise LMForgeError(f"{cfg.base} is {kind_of(meta).phrase}; {need} base")
    if adapter:
        raise LMForgeError(f"{base} is a LoRA adapter: merge it first (lmforge merge-lora {base} --out DIR)")
    model = model.float()  # train in fp32 (AdamW state and small updates need the precision)
    cfg.context_length = min(cfg.context_length or model.cfg.context_length, model.cfg.context_length)
    return cfg, model, tokenizer, base


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): a seeded random `fraction` held out (none from fewer than 10 items)."""
    n_val = int(len(items) * fraction) if len(items) >= 10 else 0
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in perm[n_val:]], [items[i] for i in perm[:n_val]]


@dataclass
class Examples:
    """Records read and encoded: what instruction tuning, reward models and DPO learn from."""

    template: Template
    records: list  # training records as read, for what a task shows or checks beyond their encoding
    val_records: list
    train: list  # encoded
    val: list


def read_examples(cfg: InstructConfig | PreferenceConfig, val_data: str | None, tokenizer: Tokenizer, max_len: int,
                  read: Callable[[str], list], encode: Callable[..., tuple[list, int]], what: str, dropped_why: str,
                  dist: Dist) -> Examples:
    """--data (`what` it holds, said when it is missing) read and encoded under --template, and
    validation records: `val_data` read as a file of its own, or a held-out share of --data.
    `encode(records, tokenizer, template, max_len)` -> (encoded, dropped) leaves out the records
    with nothing left to learn from; a warning says how many and why."""
    if not cfg.data:
        raise LMForgeError(f"--data is required ({what})")
    template = get_template(cfg.template, tokenizer)
    records = read(cfg.data)
    records, val_records = (records, read(val_data)) if val_data else hold_out(records, cfg.val_fraction, cfg.seed)
    train, dropped = encode(records, tokenizer, template, max_len)
    val, _ = encode(val_records, tokenizer, template, max_len)
    if dropped:
        dist.say(f"warning: {dropped} record(s) dropped: {dropped_why}")
    if not train:
        raise LMForgeError("no training records left to learn from")
    return Examples(template, records, val_records, train, val)


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


