"""`lmforge.load(path)`: the Python entry point to a trained model (a thin facade over
`formats.load` and `inference.generate`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .core.errors import LMForgeError
from .formats.kinds import Kind, require
from .formats.load import Loaded, load_model
from .inference.generate import generate_text
from .inference.seq2seq import seq2seq_text


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
                 repetition_penalty: float = 1.0, json_schema: dict | None = None, regex: str | None = None,
                 **kw) -> str:
        """Continue `prompt`; returns only the new text. With `json_schema` the text is JSON that
        validates against it; with `regex` it matches the regex (the grammar guarantees both).
        An encoder-decoder (T5, BART) reads `prompt` as its input and returns its output."""
        if self.kind is Kind.SEQ2SEQ:
            return self._seq2seq(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stream=stream, stop=stop, json_schema=json_schema,
                                 regex=regex, repetition_penalty=repetition_penalty, **kw)
        self.check_generates()
        if json_schema is not None or regex is not None:
            kw["grammar"] = self.grammar(json_schema=json_schema, regex=regex)
        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                             stop_ids=self.stop_ids(), stream=stream, repetition_penalty=repetition_penalty, **kw)

    def _seq2seq(self, prompt: str, *, max_new_tokens, temperature, top_k, top_p, seed, stream,
                 repetition_penalty: float = 1.0, **options) -> str:
        """`generate` for an encoder-decoder; options of decoders' generation it has no use for yet
        (stop strings, grammars, penalties, candidates) are refused, not ignored."""
        asked = [k for k, v in options.items() if v] + (["repetition_penalty"] if repetition_penalty != 1.0 else [])
        if asked:
            flags = ", ".join("--" + k.replace("_", "-") for k in asked)
            raise LMForgeError(f"an encoder-decoder does not support {flags} yet")
        return seq2seq_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop_ids=self.stop_ids(), stream=stream)

    def grammar(self, json_schema: dict | None = None, regex: str | None = None, lark: str | None = None):
        """A compiled grammar (cached) for `generate(..., grammar=)`, or None when none is given."""
        from .inference.chat import grammar_for

        return grammar_for(self, json_schema=json_schema, regex=regex, lark=lark)

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: object = None,
             parallel_tool_calls: bool = True, json_schema: dict | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, **sampling) -> dict:
        """The assistant's reply to OpenAI-format `messages`, as OpenAI's message object:
        {"role": "assistant", "content": str | None, "tool_calls": [...]} (calls only when it made any).
        `tools` and `tool_choice` are OpenAI's; calls are constrained to the tools' schemas, and with
        `json_schema` a text answer validates against it."""
        from .inference.chat import reply

        self.check_generates()
        return reply(self, messages, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                     json_schema=json_schema, max_new_tokens=max_new_tokens, temperature=temperature, **sampling)

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


def load(path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = "auto") -> LM:
    """Load an lmforge model directory, an adapter directory, a Hugging Face checkpoint directory
    or a GGUF file directly. `dtype` (auto, float32, bfloat16, float16) applies to Hugging Face
    checkpoints and unquantised GGUF weights; auto keeps the stored precision. `quantize`: "int8"
    or "int4" weights for inference; "auto" (the default) keeps a GGUF file's own precision (Q4_K_M
    stays 4-bit) and other models as stored; None or "none" dequantises everything."""
    loaded = load_model(path, device, dtype, quantize)
    return LM(loaded.model, loaded.tokenizer, loaded.meta, loaded.path)
