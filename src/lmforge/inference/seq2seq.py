"""Many sources in, their greedy outputs out, with an encoder-decoder (T5, BART): evaluation and
validation, through the engine, with the sources encoded the way training read them."""

from __future__ import annotations

from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .engine import Engine, Request
from .generate import encode_text


def translate(model: Transformer, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32,
              max_new_tokens: int | None = None, stop_ids: set[int] | None = None) -> list[str]:
    """The greedy output text for each source text, decoded `batch_size` at a time by the engine
    (continuous batching: a short answer's slot goes to the next source at once).
    `max_new_tokens` defaults to the context length."""
    ctx = model.cfg.context_length
    max_new_tokens = min(max_new_tokens or ctx, ctx)
    stops = {tokenizer.eot_id} if stop_ids is None else stop_ids
    engine = Engine(model, slots=max(1, min(batch_size, len(texts))), max_len=max_new_tokens)
    requests = [Request(encode_text(tokenizer, t, ctx)[0], max_tokens=max_new_tokens, temperature=0, stop=stops)
                for t in texts]
    return [tokenizer.decode(samples[0].tokens, skip_special=True) for samples in engine.generate(requests)]
