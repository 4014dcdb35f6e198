"""`lmforge.load(path)`: the Python entry point to a trained model (a thin facade over
`formats.load` and `inference.generate`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .formats.kinds import require
from .formats.load import Loaded, load_model
from .inference.generate import generate_text


class LM(Loaded):
    """A loaded model: `.model` (a torch Module, `model(ids)` -> logits [B, T, V]),
    `.tokenizer` (`encode`, `decode`) and `.generate(prompt, **sampling)`."""

    def check_generates(self) -> None:
        """A one-line error unless this model can generate text (a decoder)."""
        require(self.meta, str(self.path), "text generation needs a decoder (causal language model)",
                lambda k: k.generates)

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, stream: Callable[[str], None] | None = None,
                 repetition_penalty: float = 1.0, **kw) -> str:
        """Continue `prompt`; returns only the new text."""
        self.check_generates()
        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                             stop_ids=self.stop_ids(), stream=stream, repetition_penalty=repetition_penalty, **kw)

    def score(self, prompt: str, response: str, system: str | None = None) -> float:
        """A reward model's score of `response` as the answer to `prompt` (after an optional
        system message): higher = preferred."""
        from .inference.reward import score_answers

        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return score_answers(self, [conv], [response])[0]

    def __repr__(self) -> str:
        c = self.config
        return (f"LM({self.path}: {c.n_layer} layers, width {c.n_embd}, "
                f"{self.model.num_params() / 1e6:.1f}M params, context {c.context_length})")


def load(path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = None) -> LM:
    """Load an lmforge model directory, an adapter directory, a Hugging Face checkpoint directory
    or a GGUF file directly. `dtype` (auto, float32, bfloat16, float16) applies to Hugging Face
    checkpoints; auto keeps the stored precision. `quantize="int8"`: int8 weights for inference."""
    loaded = load_model(path, device, dtype, quantize)
    return LM(loaded.model, loaded.tokenizer, loaded.meta, loaded.path)
