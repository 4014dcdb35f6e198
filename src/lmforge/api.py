"""`lmforge.load(path)`: the Python entry point to a trained model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import load_model_dir, stop_token_ids
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
                 stop: list[str] | None = None, stream: Callable[[str], None] | None = None, **kw) -> str:
        """Continue `prompt`; returns only the new text."""
        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                             stop_ids=self.stop_ids(), stream=stream, **kw)

    def __repr__(self) -> str:
        c = self.config
        return (f"LM({self.path}: {c.n_layer} layers, width {c.n_embd}, "
                f"{self.model.num_params() / 1e6:.1f}M params, context {c.context_length})")


def load(path: str | Path, device: str = "auto", dtype: str = "auto") -> LM:
    """Load an lmforge model directory, or a Hugging Face checkpoint directory directly.

    `dtype` (auto, float32, bfloat16, float16) applies to Hugging Face checkpoints; auto keeps
    the stored precision.
    """
    path = Path(path)
    if is_hf_dir(path):
        model, tokenizer, meta = load_hf(path, dtype)
    else:
        model, tokenizer, meta = load_model_dir(path)
    model.to(resolve_device(device))
    return LM(model, tokenizer, meta, path)
