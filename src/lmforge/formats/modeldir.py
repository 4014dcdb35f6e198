"""The model directory: what every training command writes and every other command reads.

    DIR/config.json          architecture + what kind of model this is (lmforge's schema, versioned)
    DIR/model.safetensors    weights
    DIR/tokenizer.json       tokenizer
    DIR/train_config.yaml    the run config that produced it
    DIR/metrics.jsonl, DIR/loss.png
    DIR/state/               what --resume needs (weights, optimizer, RNG, step)

Every file is replaced atomically, so a kill at any moment leaves a loadable directory (the
training state is written by `lmforge.training.state`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path, atomic_write_json
from ..core.tensorfile import read_all
from ..models.config import ModelConfig
from ..models.lora import apply_lora
from ..models.transformer import Classifier, Transformer
from ..text.tokenizer import Tokenizer
from .kinds import Kind, is_adapter, kind_of

FORMAT_VERSION = 1


def weights_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (a tied output matrix is stored as the embedding)."""
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keep}


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LMForgeError(f"missing weights file {path}")
    return read_all(path)


def make_skeleton(meta: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    """The module a model directory's config.json describes, without weights (on the meta device)."""
    cfg = ModelConfig.from_dict(meta["model"])
    kind = kind_of(meta)
    with torch.device(device):
        if kind.pooled_head:  # a reward model is a one-output classifier on the last token
            model = Classifier(cfg, len(meta["labels"]) if kind is Kind.CLASSIFIER else 1, meta.get("pooling", "last"))
        else:
            model = Transformer(cfg)
        if is_adapter(meta):
            lo = meta["lora"]
            apply_lora(model, lo["layers"], lo["rank"], lo["alpha"], lo.get("dropout", 0.0))
    return model


def fill_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "weights") -> torch.nn.Module:
    """Assign `tensors` to a meta-device skeleton, checking that names and shapes all fit."""
    expected = weights_for_saving(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LMForgeError(f"{source} do not match the model config: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LMForgeError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.finish_loading()
    return model


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "weights") -> Transformer:
    """A language model from its config and weights, without first allocating random ones."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return fill_model(model, tensors, source)


def model_config_json(model: torch.nn.Module, tokenizer: Tokenizer, kind: Kind | str = Kind.CAUSAL_LM,
                      **extra) -> dict:
    return {"lmforge_format": FORMAT_VERSION, "kind": Kind(kind).value, "model": model.cfg.to_dict(),
            "tokenizer": {"vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}, **extra}


def save_model_dir(directory: Path, model: torch.nn.Module, tokenizer: Tokenizer, weights_file: Path | None = None,
                   **extra) -> None:
    """Write tokenizer.json, model.safetensors (or link `weights_file` in as it) and config.json, each
    atomically. config.json, which makes a directory a model directory, goes last: a kill during the
    first save leaves no half model that claims to be one."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer.json")
    _write_weights(directory, model, weights_file)
    atomic_write_json(directory / "config.json", model_config_json(model, tokenizer, **extra))


def _write_weights(directory: Path, model: torch.nn.Module, weights_file: Path | None) -> None:
    target = directory / "model.safetensors"
    if weights_file is None:
        save_weights(weights_for_saving(model), target)
        return
    tmp = directory / ".model.safetensors.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(weights_file, tmp)  # same bytes as state/: no copy, no extra disk
    except OSError:
        save_weights(weights_for_saving(model), target)
        return
    os.replace(tmp, target)


def read_config(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise LMForgeError(f"no such model directory: {directory}")
    file = directory / "config.json"
    if not file.exists():
        raise LMForgeError(f"{directory} is not a model directory (no config.json)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{file}: invalid JSON ({e.msg})") from None
    if "lmforge_format" not in cfg:
        raise LMForgeError(f"{directory} is not an lmforge model directory")
    if cfg["lmforge_format"] > FORMAT_VERSION:
        raise LMForgeError(f"{directory} was written by a newer lmforge (format {cfg['lmforge_format']})")
    return cfg


def check_vocab(tokenizer: Tokenizer, cfg: ModelConfig, where: str) -> None:
    """The tokenizer must fit the embedding matrix. A few spare rows are normal (embeddings are
    padded to a multiple of 64 or 128 for speed: Qwen2.5 has 151,936 rows for 151,665 tokens);
    many more than padding explains means the tokenizer belongs to another model."""
    n, rows = tokenizer.vocab_size, cfg.vocab_size
    if n > rows:
        raise LMForgeError(f"{where}: the tokenizer has {n} tokens but the model's embedding has only {rows} "
                           "rows: they do not belong together")
    if rows - n > max(1024, rows // 100):
        raise LMForgeError(f"{where}: the tokenizer has {n} tokens, far fewer than the model's {rows} embedding "
                           "rows: it looks like the tokenizer of a different model")


def stop_token_ids(tokenizer: Tokenizer, meta: dict) -> set[int]:
    """Tokens that end a generation: end-of-text, plus what the model directory lists (e.g. a chat
    model's end-of-turn marker)."""
    return {tokenizer.eot_id, *meta.get("stop_token_ids", [])}


def load_model_dir(directory: str | Path) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model, tokenizer, config.json contents) from an lmforge model directory with full weights
    (see `formats.load.load_parts` for adapter directories, which also need their base model)."""
    directory = Path(directory)
    meta = read_config(directory)
    tokenizer = Tokenizer.from_file(directory)
    check_vocab(tokenizer, ModelConfig.from_dict(meta["model"]), str(directory))
    model = fill_model(make_skeleton(meta), load_weights(directory / "model.safetensors"),
                       f"{directory}/model.safetensors")
    return model.eval(), tokenizer, meta




