"""The training loop: one loop for pretraining and every kind of fine-tuning.

What differs between objectives lives in a `Task` (how to make a batch, the loss, the
evaluation); the loop owns optimisation, schedules, budgets, logging, checkpoints, resume,
signals and DDP. Under `torchrun` each rank computes its slice of the same global batch and
DDP averages gradients, so N processes follow the same trajectory as one with N times the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from tqdm import tqdm

from .checkpoint import has_state, load_state, save_state
from .config import arg, explicit_keys, save_yaml
from .errors import LMForgeError
from .fileio import atomic_write
from .plot import plot_metrics, read_metrics
from .runtime import Dist, autocast, init_distributed


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


class Task(Protocol):
    """What the loop needs to know about an objective."""

    windows_per_epoch: int

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Training examples first .. first+count-1 of the endless, seeded example stream."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(mean loss, number of tokens it covers)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics, keys prefixed `val_` (run on rank 0 under no_grad)."""


def lr_at(cfg: TrainConfig, peak: float, step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine or warmup-stable-decay towards min_lr_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * cfg.min_lr_ratio
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "wsd":
        start = 1 - cfg.decay_fraction
        return peak if p < start else floor + (peak - floor) * (1 - p) / max(cfg.decay_fraction, 1e-9)
    return peak


class Budget:
    """When to stop: the first of steps, tokens, minutes or epochs to run out. Also gives the
    fraction done, which drives the schedule, so a time budget decays the LR on time."""

    def __init__(self, cfg: TrainConfig, windows_per_epoch: int) -> None:
        self.cfg, self.per_epoch = cfg, windows_per_epoch
        if not any(v is not None for v in (cfg.max_steps, cfg.max_tokens, cfg.max_minutes, cfg.epochs)):
            raise LMForgeError("give a training budget: --max-steps, --max-tokens, --max-minutes or --epochs")
        for name in ("max_steps", "max_tokens", "max_minutes", "epochs"):
            v = getattr(cfg, name)
            if v is not None and v <= 0:
                raise LMForgeError(f"--{name.replace('_', '-')} must be positive")

    def progress(self, state: dict) -> float:
        c, parts = self.cfg, [0.0]
        if c.max_steps:
            parts.append(state["step"] / c.max_steps)
        if c.max_tokens:
            parts.append(state["tokens"] / c.max_tokens)
        if c.max_minutes:
            parts.append(state["elapsed"] / (60 * c.max_minutes))
        if c.epochs:
            parts.append(state["windows"] / (self.per_epoch * c.epochs))
        return max(parts)


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and save; a second one aborts."""

    def __init__(self) -> None:
        self.requested, self._old = False, {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to abort)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); leave biases and norm gains alone."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device):
    groups = param_groups(model, cfg.weight_decay)
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    except (RuntimeError, TypeError):  # older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))


class NonFiniteLoss(LMForgeError):
    pass


@dataclass
class Run:
    """Where a run writes, and how to save the model directory part of a checkpoint."""

    out: Path
    save_model: Callable[[Path, Path | None], None]  # (out dir, weights file to link or None)
    title: str = ""


# Settings a resumed run may change; everything else must match the original run.
RESUMABLE = {"max_steps", "max_tokens", "max_minutes", "epochs", "eval_every", "eval_batches", "save_every",
             "log_every", "device", "compile", "resume", "overwrite", "out"}


def resume_config(cfg, out: Path):
    """The original run's config (from out/train_config.yaml), with only the RESUMABLE settings
    taken from `cfg`. A setting given explicitly (flag or --config) that differs is an error."""
    saved_file = out / "train_config.yaml"
    if not saved_file.exists():
        raise LMForgeError(f"nothing to resume in {out} (no train_config.yaml)")
    saved = yaml.safe_load(saved_file.read_text())
    cls = type(cfg)
    given = explicit_keys(cfg)
    if given is None:  # built in Python: treat values that differ from the defaults as given
        defaults = cls()
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    conflicts = [f"{name}={getattr(cfg, name)!r} (the run used {saved[name]!r})"
                 for name in sorted(given - RESUMABLE) if name in saved and getattr(cfg, name) != saved[name]]
    if conflicts:
        raise LMForgeError("--resume with an incompatible config: " + "; ".join(conflicts))
    return cls(**{**saved, **{k: getattr(cfg, k) for k in RESUMABLE}})


def check_out(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or (with --overwrite) a previous run's directory."""
    if out.exists() and any(out.iterdir()):
        if not any((out / f).exists() for f in ("config.json", "state", "train_config.yaml")):
            raise LMForgeError(f"{out} exists and is not a model directory; choose another --out")
        if not overwrite:
            raise LMForgeError(f"{out} already holds a model: pass --resume to continue it "
                               "or --overwrite to replace it")


def start_run_dir(cfg, out: Path) -> None:
    """Create (or, with --overwrite, recreate) the run directory and record the config in it."""
    if not cfg.resume:
        check_out(out, cfg.overwrite)
        if out.exists():
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "train_config.yaml")


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run: Run, lr: float,
        on_step: Callable[[int], None] | None = None, ddp: tuple[Dist, torch.device] | None = None) -> dict:
    """Train `model` on `task` until the budget runs out or a stop is requested.

    Returns the final trainer record (step, tokens, elapsed, last metrics).
    """
    dist_info, device = ddp or init_distributed(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg, lr, device)
    budget = Budget(cfg, task.windows_per_epoch)
    warmup = min(cfg.warmup_steps, cfg.max_steps // 10) if cfg.max_steps else cfg.warmup_steps
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "windows": 0, "last_saved_step": 0}
    metrics_file = run.out / "metrics.jsonl"
    if cfg.resume:
        state.update(load_state(run.out, model, optimizer))
        if dist_info.main:  # drop rows logged after the checkpoint: they will be logged again
            rows = [r for r in read_metrics(metrics_file) if r.get("step", 0) <= state["step"]]
            atomic_write(metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
    elif dist_info.main:
        metrics_file.unlink(missing_ok=True)
    dist_info.barrier()

    train_model = torch.compile(model) if cfg.compile else model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # imports torch._dynamo: slow

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    global_windows = cfg.batch_size * cfg.grad_accum * dist_info.world
    params = [p for p in model.parameters() if p.requires_grad]

    def save() -> None:
        if dist_info.main:
            weights = save_state(run.out, model, optimizer, state)
            run.save_model(run.out, weights)
            with contextlib.suppress(Exception):  # a plot is never worth losing a checkpoint over
                plot_metrics(metrics_file, run.out / "loss.png", run.title)
        state["last_saved_step"] = state["step"]
        dist_info.barrier()

    def evaluate() -> dict:
        if not dist_info.main:
            return {}
        model.eval()
        with torch.no_grad(), autocast(device):
            out = task.evaluate(model)
        model.train()
        return out

    bar = tqdm(total=100, disable=not dist_info.main, unit="%", dynamic_ncols=True, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    bar.update(100 * min(budget.progress(state), 1.0))
    log_loss, log_tokens, log_steps, log_time = 0.0, 0, 0, time.perf_counter()
    last_row: dict = {}
    model.train()
    with StopRequest() as stop:
        while True:
            t0 = time.perf_counter()
            progress = budget.progress(state)
            done, stopping = progress >= 1.0, stop.requested
            if dist_info.world > 1:  # every rank stops together (time and signals differ between processes)
                flags = dist_info.all_reduce_max(torch.tensor([progress, float(stopping)], device=device))
                done, stopping = bool(flags[0] >= 1.0), bool(flags[1] > 0)
            if done or stopping:
                break
            lr_now = lr_at(cfg, lr, state["step"], progress, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            loss_sum = torch.zeros((), device=device)
            n_tokens = 0
            for micro in range(cfg.grad_accum):
                first = state["windows"] + (micro * dist_info.world + dist_info.rank) * cfg.batch_size
                batch = _move(task.batch(first, cfg.batch_size), device)
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or dist_info.world == 1 else train_model.no_sync()
                with sync, autocast(device):
                    loss, ntok = task.loss(train_model, batch)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
                n_tokens += ntok
            totals = dist_info.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n_tokens), device=device)]))
            step_loss = totals[0].item() / (cfg.grad_accum * dist_info.world)
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(
                    f"the loss became {step_loss} at step {state['step'] + 1}: training stopped. "
                    f"The last good checkpoint (step {state['last_saved_step']}) is kept in {run.out}; "
                    "try a lower --lr or more --warmup-steps")
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["windows"] += global_windows
            state["tokens"] += int(totals[1].item())
            state["elapsed"] += time.perf_counter() - t0
            log_loss, log_tokens, log_steps = log_loss + step_loss, log_tokens + int(totals[1].item()), log_steps + 1
            step = state["step"]
            done = budget.progress(state) >= 1.0
            do_eval = step % cfg.eval_every == 0 or done
            if step % cfg.log_every == 0 or do_eval or done:
                now = time.perf_counter()
                row = {"step": step, "tokens": state["tokens"], "loss": round(log_loss / log_steps, 6),
                       "lr": lr_now, "tokens_per_sec": round(log_tokens / max(now - log_time, 1e-9), 1),
                       "elapsed_s": round(state["elapsed"], 2),
                       "epoch": round(state["windows"] / task.windows_per_epoch, 4)}
                if grad_norm is not None:
                    row["grad_norm"] = round(grad_norm, 4)
                if do_eval:
                    t_eval = time.perf_counter()
                    row.update(evaluate())
                    state["elapsed"] += time.perf_counter() - t_eval
                if dist_info.main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    post = {"step": step, "loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_sec']:,.0f}"}
                    if "val_loss" in row:
                        post["val"] = f"{row['val_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                last_row = row
                log_loss, log_tokens, log_steps, log_time = 0.0, 0, 0, time.perf_counter()
            bar.update(100 * min(budget.progress(state), 1.0) - bar.n)
            if cfg.save_every and step % cfg.save_every == 0 and not done:
                t_save = time.perf_counter()
                save()
                state["elapsed"] += time.perf_counter() - t_save
            if on_step is not None:
                on_step(step)
        bar.close()
        interrupted = stop.requested
    if state["step"] != state["last_saved_step"] or not has_state(run.out):
        save()
    if interrupted and dist_info.main:
        print(f"stopped at step {state['step']}; checkpoint saved in {run.out} (continue with --resume)",
              file=sys.stderr)
    state["metrics"], state["interrupted"] = last_row, interrupted
    return state
