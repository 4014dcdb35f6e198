"""DIR/state/: what `--resume` needs (trainable weights, optimizer, RNG, trainer record).

Written in full beside the old one as state.new/ and then swapped in, so a kill at any moment
leaves a complete state directory. An --fsdp run keeps its weights and optimizer as sharded
Distributed Checkpoint files in state/dcp/ (see `sharded`), beside the full weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json, recover_dir, replace_dir
from ..formats.modeldir import load_weights, save_weights, trainable_weights, weights_for_saving
from ..models.transformer import Transformer
from .sharded import SHARDS, is_sharded, read_shards

STATE_MARKER = "trainer.json"  # written last: its presence means the state directory is complete


def save_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               trainer: dict, full_weights: dict | None = None) -> Path | None:
    """Write DIR/state atomically. It holds the trainable weights (all of them, unless layers are
    frozen or adapters used); returns their path when they are the complete model, else None.
    A sharded run passes `full_weights` (gathered by `sharded.write_shards`, whose state.new/dcp
    holds the optimizer): only they, the RNG and the record are left to write."""
    new = directory / "state.new"
    new.mkdir(parents=True, exist_ok=True)
    if full_weights is not None:
        save_weights(full_weights, new / "model.safetensors")
        save_weights(_rng(), new / "rng.safetensors")
        atomic_write_json(new / STATE_MARKER, trainer)
        replace_dir(new, directory / "state")
        return directory / "state" / "model.safetensors"
    weights = trainable_weights(model)
    complete = set(weights) == set(weights_for_saving(model))
    save_weights(weights, new / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    save_weights({**tensors, **_rng()}, new / "optimizer.safetensors")
    atomic_write_json(new / "optimizer.json", {"param_groups": opt["param_groups"],
                                               "scalars": {str(i): {k: v for k, v in s.items()
                                                                    if not isinstance(v, torch.Tensor)}
                                                           for i, s in opt["state"].items()}})
    atomic_write_json(new / STATE_MARKER, trainer)
    replace_dir(new, directory / "state")
    return directory / "state" / "model.safetensors" if complete else None


def _rng() -> dict[str, torch.Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng(saved: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(saved["rng.cpu"])
    if "rng.cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng.cuda"])


def has_state(directory: Path) -> bool:
    recover_dir(directory / "state", STATE_MARKER)
    return (directory / "state" / STATE_MARKER).exists()


def load_state(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from DIR/state; returns the trainer record."""
    state = directory / "state"
    if not has_state(directory):
        raise LMForgeError(f"nothing to resume in {directory} (no complete state/ directory)")
    if (state / SHARDS).is_dir():
        read_shards(state, model, optimizer)
        _set_rng(load_weights(state / "rng.safetensors"))
        return json.loads((state / STATE_MARKER).read_text())
    if is_sharded(model):
        raise LMForgeError(f"{state} was saved without --fsdp: resume it without --fsdp (a run saved with "
                           "--fsdp resumes either way)")
    tensors = load_weights(state / "model.safetensors")
    _, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(trainable_weights(model)) - set(tensors):
        raise LMForgeError(f"{state}: saved weights do not fit this model")
    saved = load_weights(state / "optimizer.safetensors")
    info = json.loads((state / "optimizer.json").read_text())
    opt_state: dict = {}
    for key, value in saved.items():
        if key.startswith("rng."):
            continue
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    for i, scalars in info["scalars"].items():
        opt_state.setdefault(int(i), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
    _set_rng(saved)
    return json.loads((state / STATE_MARKER).read_text())

