"""The training loop: one loop for pretraining and every kind of fine-tuning.

What differs between objectives lives in a `Task` (how to make a batch, the loss, the
evaluation); the `Trainer` owns optimisation, schedules, budgets, logging, checkpoints, resume,
signals and DDP or FSDP. Under `torchrun` each rank computes its slice of the same global batch, and the
gradient is that of the weighted mean loss over the whole global batch (per target token, say),
so N processes follow the trajectory of one with N times the batch, and accumulating micro-batches
equals one big batch, however unevenly the targets fall between them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from ..core.errors import LMForgeError
from ..core.runtime import Dist, autocast, peak_flops
from ..models.config import flops_per_token
from .checkpoint import Checkpointer
from .config import TrainConfig
from .metrics import MetricsLog
from .optim import make_optimizer
from .prefetch import Prefetcher
from .rundir import Run, record_config
from .schedule import Budget, Schedule
from .sharded import check_fsdp, no_sync, shard
from .state import load_state
from .tracking import TB_DIR


class Task(Protocol):
    """What the loop needs to know about an objective."""

    windows_per_epoch: int
    # Optional `prefetch = True`: the loop builds the next batch in a background thread while a
    # step computes. Only for a task whose `batch` is a pure function of its arguments that leaves
    # the model alone (not one whose batches run the model, such as RL rollouts).

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Training examples first .. first+count-1 of the endless, seeded example stream."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, int]:
        """(mean loss, weight, tokens): the loss averaged over the batch's units (target tokens,
        examples, pairs, ...), how many units that is (or their summed weight), and the tokens
        read (for --max-tokens and tokens/s). The loop weights each micro-batch by its weight."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics, keys prefixed `val_`, run under no_grad: on rank 0, or on every rank
        for a task with `shares_evaluation = True` (each rank a share of the same examples, the
        sums all-reduced: the same metrics on every rank, whatever their number) or under FSDP."""


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and save; a second one aborts."""

    def __init__(self, announce: bool = True) -> None:
        self.requested, self.announce, self._old = False, announce, {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
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


class Trainer:
    """One run of the loop. A step: this rank's micro-batches forward and backward, one
    all-reduce of (loss, weight, tokens), the gradient scaled to the global weighted mean, clip,
    optimizer step. After it, one all-reduce agrees on the elapsed time and on stop requests, so
    every rank takes the same decisions (LR, evaluations, checkpoints, the end)."""

    def __init__(self, model: torch.nn.Module, task: Task, cfg: TrainConfig, run: Run, lr: float, dist: Dist,
                 device: torch.device, on_step: Callable[[int], None] | None = None) -> None:
        self.model, self.task, self.cfg, self.run, self.peak = model.to(device), task, cfg, run, lr
        self.dist, self.device, self.on_step = dist, device, on_step
        if cfg.fsdp:  # before the optimizer, which must hold the sharded parameters
            check_fsdp(dist)
            if not all(p.requires_grad for p in self.model.parameters()):
                raise LMForgeError("--fsdp trains every weight: it does not combine with LoRA or frozen layers")
            shard(self.model, device)
        self.optimizer = make_optimizer(self.model, cfg, lr, device)
        self.budget = Budget(cfg, task.windows_per_epoch)
        self.schedule = Schedule(cfg, lr)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.global_windows = cfg.batch_size * cfg.grad_accum * dist.world
        self.record: dict = {"step": 0, "tokens": 0, "elapsed": 0.0, "windows": 0, "last_saved_step": 0}
        cfg_model = getattr(self.model, "cfg", None)
        self.log = MetricsLog(run.out / "metrics.jsonl", dist.main, task.windows_per_epoch, dist.world,
                              flops_per_token(cfg_model) if cfg_model is not None else None, peak_flops(device),
                              board=run.out / TB_DIR if cfg.tensorboard else None)
        self.batches = Prefetcher(task.batch, device, getattr(task, "prefetch", False))
        self.checkpoints = Checkpointer(run, self.model, self.optimizer, dist, cfg.keep)
        self.train_model: torch.nn.Module = self.model
        self.grad_norm: float | None = None
        self.final_row: dict = {}
        self.t_start, self.elapsed_at_start = time.perf_counter(), 0.0

    @property
    def progress(self) -> float:
        return self.budget.progress(self.record)

    def fit(self) -> dict:
        """Train until the budget runs out or a stop is requested; see `fit`."""
        self.start()
        done = stopping = False
        self.model.train()
        try:
            with StopRequest(announce=self.dist.main) as stop:
                while not (done or stopping):
                    lr = self.schedule.lr(self.record["step"], self.progress)
                    self.step(lr)
                    if self.on_step is not None:
                        self.on_step(self.record["step"])
                    stopping = self.agree(stop.requested)
                    done = self.progress >= 1.0
                    self.after_step(lr, done=done, final=done or stopping)
        finally:
            self.log.close()
            self.batches.close()
        return self.finish(interrupted=stopping and not done)

    def start(self) -> None:
        """Restore a resumed run, refuse one with nothing left to do, and only then, with every
        check passed, touch the run directory (a failed resume leaves it as it was)."""
        cfg, rec = self.cfg, self.record
        if cfg.resume:
            rec.update(load_state(self.run.out, self.model, self.optimizer))
        progress = self.progress
        if progress >= 1.0:
            raise LMForgeError(self.budget.nothing_left(rec))
        if cfg.resume:
            self.schedule = Schedule(cfg, self.peak, resumed_at=(progress, rec.get("schedule_position", progress)))
        self.dist.on_main(self._open_run_dir)
        if cfg.resume:
            of = f"of {cfg.max_steps}" if cfg.max_steps else f"({100 * progress:.0f}% of {self.budget.describe()})"
            self.dist.say(f"resumed from step {rec['step']} {of}")
        self.train_model = self._wrap(self.model)
        self.log.open_bar(progress)
        self.t_start, self.elapsed_at_start = time.perf_counter(), rec["elapsed"]

    def _open_run_dir(self) -> None:
        record_config(self.cfg, self.run.out)
        self.log.start(self.record["step"] if self.cfg.resume else None)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.world > 1 and not self.cfg.fsdp:  # FSDP's sharding was done in __init__
            from torch.nn.parallel import DistributedDataParallel as DDP  # imports torch._dynamo: slow

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def compute_gradients(self) -> tuple[float, int]:
        """Forward and backward over this rank's micro-batches, leaving in `.grad` the gradient of
        the weighted mean loss over the whole global batch. Returns (that loss, global tokens).

        Each backward is of a micro-batch's loss *sum* (mean x weight), so gradients add up by
        weight over micro-batches (and DDP averages them over ranks); the global weight, from the
        same all-reduce as the loss for the log, gives the factor that makes that sum the mean."""
        cfg, d = self.cfg, self.dist
        loss_sum = torch.zeros((), dtype=torch.float32 if self.device.type == "mps" else torch.float64,
                               device=self.device)
        weight, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            first = self.record["windows"] + (micro * d.world + d.rank) * cfg.batch_size
            # built ahead: this rank's next batch (the next micro-batch's, or the next step's first)
            batch = self.batches.get(first, cfg.batch_size, then=first + d.world * cfg.batch_size)
            sync = micro == cfg.grad_accum - 1 or d.world == 1  # DDP / FSDP reduce on the last backward only
            if sync:
                accumulate = contextlib.nullcontext()
            else:
                accumulate = no_sync(self.model) if cfg.fsdp else self.train_model.no_sync()
            with accumulate:
                with autocast(self.device):
                    mean, w, n = self.task.loss(self.train_model, batch)
                (mean.float() * w).backward()
            loss_sum += mean.detach().to(loss_sum.dtype) * w
            weight, tokens = weight + w, tokens + n
        totals = d.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(weight), loss_sum.new_tensor(tokens)]))
        loss_sum, weight, tokens = totals.tolist()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and weight > 0 and d.world != weight:
            torch._foreach_mul_(grads, d.world / weight)
        return (loss_sum / weight if weight > 0 else math.nan), int(tokens)

    def step(self, lr: float) -> None:
        """One optimizer step over the global batch."""
        loss, tokens = self.compute_gradients()
        rec = self.record
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(
                f"the loss became {loss} at step {rec['step'] + 1}: training stopped. "
                f"The last good checkpoint (step {rec['last_saved_step']}) is kept in {self.run.out}; "
                "try a lower --lr or more --warmup-steps")
        self.grad_norm = None
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: DTensor
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a group with its own peak (Muon's) keeps its ratio
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec["step"] += 1
        rec["windows"] += self.global_windows
        rec["tokens"] += tokens
        self.log.add(loss, tokens)

    def agree(self, stop_requested: bool) -> bool:
        """Ranks measure time and receive signals at different moments: take the largest elapsed
        time and any rank's stop request, so that all of them decide alike. Returns the stop."""
        elapsed = self.elapsed_at_start + time.perf_counter() - self.t_start
        if self.dist.world > 1:
            flags = torch.tensor([elapsed, float(stop_requested)], dtype=torch.float64, device=self.device)
            elapsed, stop = self.dist.all_reduce_max(flags).tolist()
            stop_requested = stop > 0
        self.record["elapsed"] = elapsed
        self.record["schedule_position"] = self.schedule.position(self.progress)
        return stop_requested

    def after_step(self, lr: float, done: bool, final: bool) -> None:
        """Log, evaluate and checkpoint as scheduled. The last step is always logged, and
        evaluated when the budget ran out (not when a stop was requested: that should be quick)."""
        cfg, step = self.cfg, self.record["step"]
        evaluate = step % cfg.eval_every == 0 or done
        if step % cfg.log_every == 0 or evaluate or final:
            row = self.log.row(self.record, lr, self.grad_norm)
            row.update(self.task_metrics())
            if evaluate:
                row.update(self.evaluate())
                self.checkpoints.evaluated(row, self.record)
            self.log.write(row)
            self.final_row = row
        self.log.progress(self.progress)
        if cfg.save_every and step % cfg.save_every == 0 and not final:
            self.checkpoints.save(self.record)

    def task_metrics(self) -> dict:
        """A task's own training metrics since the last row (DPO's rewards/*, RLHF's reward and KL):
        its `take_metrics()` gives {name: (sum, count)}, the same names on every rank, summed over
        the ranks here. Tasks without it log the loss alone."""
        take = getattr(self.task, "take_metrics", None)
        if take is None:
            return {}
        sums = take()
        names = sorted(sums)
        t = self.dist.all_reduce_sum(torch.tensor([v for n in names for v in sums[n]], dtype=torch.float64,
                                                  device=self.device)).tolist()
        return {n: round(t[2 * i] / t[2 * i + 1], 6) for i, n in enumerate(names) if t[2 * i + 1] > 0}

    def evaluate(self) -> dict:
        """Validation metrics, computed on rank 0 and shared, so every rank decides alike (and a
        failure there stops them all instead of leaving them waiting). A task that shares its
        evaluation between the ranks, and a sharded model (whose forward passes need every rank),
        are evaluated on every rank, each ending with the same metrics."""
        if self.cfg.fsdp or getattr(self.task, "shares_evaluation", False):
            return self._evaluate_here()
        return self.dist.on_main(self._evaluate_here)

    def _evaluate_here(self) -> dict:
        self.model.eval()
        with torch.no_grad(), autocast(self.device):
            metrics = self.task.evaluate(self.model)
        self.model.train()
        return metrics

    def finish(self, interrupted: bool) -> dict:
        rec = self.record
        if rec["step"] != rec["last_saved_step"]:
            self.checkpoints.save(rec)
        model_step = self.checkpoints.model_step(rec)
        if interrupted:
            self.dist.say(f"stopped: checkpoint saved at step {rec['step']} (continue with --resume)")
        best = f" (the weights of step {model_step}: best validation loss)" if model_step != rec["step"] else ""
        self.dist.say(f"model directory: {self.run.out}{best}")
        return {**rec, "metrics": self.final_row, "interrupted": interrupted, "rank": self.dist.rank,
                "model_step": model_step}


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run: Run, lr: float,
        on_step: Callable[[int], None] | None = None, *, ddp: tuple[Dist, torch.device]) -> dict:
    """Train `model` on `task` until the budget runs out or a stop is requested.

    Returns the trainer record (step, tokens, elapsed, windows) with "metrics" (the last step's
    metrics row), "interrupted", "model_step" (whose weights the model directory holds) and
    "rank" (0 on the process that reports; under torchrun the others should stay quiet).
    The caller owns the process group (`core.runtime.distributed`)."""
    dist_info, device = ddp
    return Trainer(model, task, cfg, run, lr, dist_info, device, on_step).fit()
