"""Autoregressive generation: temperature, top-k, top-p, seeds, stop strings, KV cache, streaming.

`generate_ids` is the token loop; `generate_text` adds text concerns on top: stop strings,
streaming only complete UTF-8 characters, and the ranked candidates at each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast
from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .sampling import filter_probs, penalize_repeats


@dataclass
class Step:
    token: int
    probs: torch.Tensor  # the distribution the token was drawn from (after temperature/top-k/top-p;
    #                      for greedy decoding, the model's distribution, whose argmax was taken)


@torch.no_grad()
def generate_ids(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: set[int] = frozenset(), use_cache: bool = True,
                 repetition_penalty: float = 1.0) -> Iterator[Step]:
    """Yield one `Step` per new token until `max_new_tokens` or a token in `stop_ids` (not yielded)."""
    ctx = model.cfg.context_length
    if not prompt:
        raise LMForgeError("the prompt is empty")
    if len(prompt) + max_new_tokens > ctx:
        raise LMForgeError(f"--max-new-tokens {max_new_tokens} plus the prompt's {len(prompt)} tokens exceeds the "
                           f"model's context length of {ctx} tokens")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt], device=device)
    cache = model.new_cache(1, len(prompt) + max_new_tokens) if use_cache else None
    model.eval()
    next_input = ids
    penalize = repetition_penalty != 1.0
    if penalize:  # tokens already in the text, for the repetition penalty
        seen = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[ids[0]] = True
    for _ in range(max_new_tokens):
        with autocast(device):
            logits = model(next_input if use_cache else ids, cache=cache, last_only=True)[0, -1]
        if penalize:
            logits = penalize_repeats(logits.float(), seen, repetition_penalty)
        probs = filter_probs(logits, temperature, top_k, top_p).cpu()
        token = int(torch.multinomial(probs, 1, generator=gen)) if temperature > 0 else int(probs.argmax())
        if token in stop_ids:
            return
        yield Step(token, probs)
        if penalize:
            seen[token] = True
        next_input = torch.tensor([[token]], device=device)
        if not use_cache:
            ids = torch.cat([ids, next_input], dim=1)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn out to start a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int | None = None,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: list[str] | None = None, stop_ids: set[int] | None = None,
                  repetition_penalty: float = 1.0, stream: Callable[[str], None] | None = None, top_candidates: int = 0,
                  on_candidates: Callable[[int, list[tuple[str, float]], str], None] | None = None,
                  prompt_ids: list[int] | None = None) -> str:
    """The completion of `prompt` (without the prompt), streamed piecewise to `stream` if given.

    Generation ends at an end-of-text token, at a `stop` string (not included), or after
    `max_new_tokens` (default: 200, or what fits in the context window). With `top_candidates` K,
    `on_candidates(step, [(token, prob)...], chosen)` sees the K most likely next tokens of the
    distribution each token was drawn from.
    """
    stops = [s for s in (stop or []) if s]
    # add_special_tokens: models trained with a leading BOS (Llama) expect one in the prompt too
    ids = prompt_ids if prompt_ids is not None else tokenizer.encode(prompt, add_special_tokens=True)
    if max_new_tokens is None:  # not asked for: as much as fits, up to 200
        max_new_tokens = max(1, min(200, model.cfg.context_length - len(ids)))
    end = {tokenizer.eot_id} if stop_ids is None else stop_ids
    new: list[int] = []
    emitted = 0
    text = ""
    for i, step in enumerate(generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, stop_ids=end,
                                          repetition_penalty=repetition_penalty)):
        new.append(step.token)
        if top_candidates and on_candidates is not None:
            p, idx = step.probs.topk(min(top_candidates, step.probs.numel()))
            ranked = [(tokenizer.decode([int(t)]), float(q)) for q, t in zip(p, idx) if q > 0]
            on_candidates(i + 1, ranked, tokenizer.decode([step.token]))
        text = tokenizer.decode(new)
        hit = min((text.find(s) for s in stops if s in text), default=-1)
        if hit >= 0:
            text = text[:hit]
            break
        if stream is not None and not text.endswith("\ufffd"):  # wait for a complete character
            safe = len(text) - _held_back(text, stops)
            if safe > emitted:
                stream(text[emitted:safe])
                emitted = safe
    if stream is not None and len(text) > emitted:
        stream(text[emitted:])
    return text
