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


@dataclass
class Run:
    """Where a run writes, and how to save the model directory part of a checkpoint."""

    out: Path
    save_model: Callable[[Path, Path | None], None]  # (out dir, weights file to link or None)
    title: str = ""


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

