"""How far a run has come, and the learning rate there: budgets and schedules."""

from __future__ import annotations

import math

from ..core.errors import LMForgeError
from .config import TrainConfig


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

