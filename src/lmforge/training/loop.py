"""The training loop: one loop for pretraining and every kind of fine-tuning.

What differs between objectives lives in a `Task` (how to make a batch, the loss, the
evaluation); the loop owns optimisation, schedules, budgets, logging, checkpoints, resume,
signals and DDP. Under `torchrun` each rank computes its slice of the same global batch and
DDP averages gradients, so N processes follow the same trajectory as one with N times the batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm import tqdm

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write
from ..core.runtime import Dist, autocast, init_distributed
from .config import TrainConfig
from .optim import make_optimizer
from .plot import plot_metrics, read_metrics
from .rundir import Run
from .schedule import Budget, lr_at
from .state import has_state, load_state, save_state


class Task(Protocol):
    """What the loop needs to know about an objective."""

    windows_per_epoch: int

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Training examples first .. first+count-1 of the endless, seeded example stream."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(mean loss, number of tokens it covers)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics, keys prefixed `val_` (run on rank 0 under no_grad)."""


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


class NonFiniteLoss(LMForgeError):
    pass


# Settings a resumed run may change; everything else must match the original run.


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
