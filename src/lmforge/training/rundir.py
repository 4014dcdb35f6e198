"""The run directory: creating it, refusing to clobber one, and the config checks of --resume."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.config import explicit_keys, save_yaml
from ..core.errors import LMForgeError
from .schedule import BUDGETS


@dataclass
class Run:
    """Where a run writes, and how to save the model directory part of a checkpoint."""

    out: Path
    # (out dir, weights file to link or None, **metadata for config.json)
    save_model: Callable[..., None]
    title: str = ""


RESUMABLE = {*BUDGETS, "eval_every", "eval_batches", "save_every", "log_every", "keep", "device", "compile",
             "fsdp", "resume", "overwrite", "out", "tensorboard"}


def _given(cfg) -> set[str]:
    """Names the user set: by flag or --config, or (built in Python) values that differ from the defaults."""
    given = explicit_keys(cfg)
    if given is None:
        defaults = type(cfg)()
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    return given


def resume_config(cfg, out: Path):
    """The original run's config (from out/train_config.yaml), with only the RESUMABLE settings
    taken from `cfg`. A setting given explicitly (flag or --config) that differs is an error.
    Without any budget given, the run keeps the budget it was saved with."""
    saved_file = out / "train_config.yaml"
    if not saved_file.exists():
        raise LMForgeError(f"nothing to resume in {out} (no train_config.yaml)")
    saved = yaml.safe_load(saved_file.read_text())
    cls = type(cfg)
    given = _given(cfg)
    conflicts = [f"{name}={getattr(cfg, name)!r} (the run used {saved[name]!r})"
                 for name in sorted(given - RESUMABLE) if name in saved and getattr(cfg, name) != saved[name]]
    if conflicts:
        raise LMForgeError("--resume with an incompatible config: " + "; ".join(conflicts))
    keep = RESUMABLE if any(getattr(cfg, b) is not None for b in BUDGETS) else RESUMABLE - set(BUDGETS)
    return cls(**{**saved, **{k: getattr(cfg, k) for k in keep}})


def record_config(cfg, out: Path) -> None:
    """out/train_config.yaml: the full config, as `--config` would reproduce the run (so never
    with resume: true)."""
    save_yaml(dataclasses.replace(cfg, resume=False), out / "train_config.yaml")


def check_out(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or (with --overwrite) a previous run's directory."""
    if out.exists() and any(out.iterdir()):
        if not any((out / f).exists() for f in ("config.json", "state", "train_config.yaml", "tokenizer.json")):
            raise LMForgeError(f"{out} exists and is not a model directory; choose another --out")
        if not overwrite:
            raise LMForgeError(f"{out} already holds a model: pass --resume to continue it "
                               "or --overwrite to replace it")


def start_run_dir(cfg, out: Path) -> None:
    """Create (or, with --overwrite, recreate) the run directory; a resumed run's is left alone.
    Call it on one process only (`Dist.on_main`): the others must not race on the removal.
    The config is recorded by the loop, once training really starts."""
    if cfg.resume:
        return
    check_out(out, cfg.overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
