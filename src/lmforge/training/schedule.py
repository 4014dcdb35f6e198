"""How far a run has come, and the learning rate there: budgets and schedules."""

from __future__ import annotations

import math

from ..core.config import check, flag
from ..core.errors import LMForgeError
from .config import TrainConfig

BUDGETS = ("max_steps", "max_tokens", "max_minutes", "epochs")
WARMUP_SHARE = 0.1  # warmup never takes more than this share of the budget


def check_budget(cfg: TrainConfig) -> None:
    """The declared bounds (as the CLI checks them; Python callers get the same) and at least one
    budget. Checked before any work: model sizing and the schedule divide by the budget."""
    check(cfg)
    if all(getattr(cfg, name) is None for name in BUDGETS):
        raise LMForgeError("give a training budget: --max-steps, --max-tokens, --max-minutes or --epochs")


def _decay(cfg: TrainConfig, peak: float, p: float) -> float:
    floor = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "wsd":
        start = 1 - cfg.decay_fraction
        return peak if p < start else floor + (peak - floor) * (1 - p) / max(cfg.decay_fraction, 1e-9)
    return peak


def lr_at(cfg: TrainConfig, peak: float, step: int, progress: float) -> float:
    """The LR of the step after `step` steps, at `progress` (0..1) through the budget.

    Linear warmup that ends after `warmup_steps` steps or once WARMUP_SHARE of the budget is
    spent, whichever comes first (so a short run of any budget kind is not all warmup); times
    cosine or warmup-stable-decay towards min_lr_ratio * peak (or constant)."""
    p = min(max(progress, 0.0), 1.0)
    warm = 1.0
    if cfg.warmup_steps > 0:
        warm = min(1.0, max((step + 1) / cfg.warmup_steps, p / WARMUP_SHARE))
    return warm * _decay(cfg, peak, p)


class Schedule:
    """The LR of each step. When a resumed run's budget differs from the one its checkpoint was
    planned for, the rest of the schedule (from where it stood, at the LR it had) is stretched or
    squeezed to end with the new budget: no jump in the LR. A run extended after it finished
    continues at its final LR."""

    def __init__(self, cfg: TrainConfig, peak: float, resumed_at: tuple[float, float] | None = None) -> None:
        # resumed_at: (progress under the current budget, schedule position saved with the checkpoint)
        self.cfg, self.peak = cfg, peak
        self.anchor = resumed_at if resumed_at and resumed_at[0] != resumed_at[1] else None

    def position(self, progress: float) -> float:
        """Where in the schedule (0..1) a run at `progress` through its budget stands."""
        if self.anchor is None:
            return progress
        p0, q0 = self.anchor
        return q0 + (1 - q0) * (progress - p0) / (1 - p0) if p0 < 1 else 1.0

    def lr(self, step: int, progress: float) -> float:
        return lr_at(self.cfg, self.peak, step, self.position(progress))


class Budget:
    """When to stop: the first of steps, tokens, minutes or epochs to run out. Also gives the
    fraction done, which drives the schedule, so a time budget decays the LR on time."""

    def __init__(self, cfg: TrainConfig, windows_per_epoch: int) -> None:
        check_budget(cfg)
        self.cfg, self.per_epoch = cfg, windows_per_epoch

    def _fractions(self, state: dict) -> dict[str, float]:
        c, used = self.cfg, {}
        if c.max_steps:
            used["max_steps"] = state["step"] / c.max_steps
        if c.max_tokens:
            used["max_tokens"] = state["tokens"] / c.max_tokens
        if c.max_minutes:
            used["max_minutes"] = state["elapsed"] / (60 * c.max_minutes)
        if c.epochs:
            used["epochs"] = state["windows"] / (max(self.per_epoch, 1) * c.epochs)
        return used

    def progress(self, state: dict) -> float:
        return max([0.0, *self._fractions(state).values()])

    def describe(self, name: str | None = None) -> str:
        """'3000 steps', '20 minutes', ...: one budget, or all of them joined by 'or'."""
        if name is None:
            return " or ".join(self.describe(n) for n in BUDGETS if getattr(self.cfg, n) is not None)
        v = getattr(self.cfg, name)
        unit = {"max_steps": "steps", "max_tokens": "tokens", "max_minutes": "minutes", "epochs": "epochs"}[name]
        return f"{v:g} {unit}" if isinstance(v, float) else f"{v} {unit}"

    def nothing_left(self, state: dict) -> str:
        """The message for a resumed run whose budget is already spent, naming what to raise."""
        spent = [n for n, used in self._fractions(state).items() if used >= 1.0]
        return (f"nothing to do: the run already reached its budget of "
                f"{' and '.join(self.describe(n) for n in spent)}; pass a larger "
                f"{' and '.join(flag(n) for n in spent)} to continue")
