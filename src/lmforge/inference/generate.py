"""Autoregressive generation: temperature, top-k, top-p, seeds, stop strings, KV cache, streaming.

`generate_text` runs one request on the batching engine (`engine.Engine`) and adds text concerns
on top: the prompt's fit in the context window (`prepare_prompt`), stop strings, streaming only
complete UTF-8 characters, and the ranked candidates at each step. `generate_ids` is the plain
one-sequence token loop, kept as the simple reference the engine is tested against.
`generate_seq2seq_ids` is its twin for encoder-decoders (T5, BART): encode once, then decode
token by token through the KV cache, which holds the cross-attention keys and values.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast, eval_mode
from ..models.config import ModelConfig
from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .engine import Engine, Event, Request
from .grammar import Grammar
from .prefix_cache import PrefixCache
from .sampling import filter_probs, penalize_repeats, validate_sampling
from .textstream import TextStream, hidden_ids

DEFAULT_NEW_TOKENS = 200
TRUNCATE = ("left",)


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
    next_input = ids
    penalize = repetition_penalty != 1.0
    if penalize:  # tokens already in the text, for the repetition penalty
        seen = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[ids[0]] = True
    with eval_mode(list(model.modules())):  # each module's mode back when the caller stops reading
        for _ in range(max_new_tokens):
            with autocast(device):
                logits = model(next_input if use_cache else ids, cache=cache, last_only=True)[0, -1]
            if penalize:
                logits = penalize_repeats(logits.float(), seen, repetition_penalty)
            probs = filter_probs(logits, temperature, top_k, top_p).cpu()
            token = _draw(probs, temperature, gen)
            if token in stop_ids:
                return
            yield Step(token, probs)
            if penalize:
                seen[token] = True
            next_input = torch.tensor([[token]], device=device)
            if not use_cache:
                ids = torch.cat([ids, next_input], dim=1)


def _draw(probs: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=gen)) if temperature > 0 else int(probs.argmax())


@torch.no_grad()
def generate_seq2seq_ids(model: Transformer, src: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                         stop_ids: set[int] = frozenset()) -> Iterator[Step]:
    """An encoder-decoder's output for source ids `src`, one `Step` per new token until
    `max_new_tokens` or a token in `stop_ids` (not yielded); greedy by default. The encoder runs
    once; its cross-attention keys and values go into the KV cache with the first decoder step."""
    cfg = model.cfg
    if not cfg.is_encoder_decoder:
        raise LMForgeError("generate_seq2seq_ids needs an encoder-decoder model")
    if not src:
        raise LMForgeError("the source is empty")
    if len(src) > cfg.context_length or max_new_tokens > cfg.context_length:
        raise LMForgeError(f"the source ({len(src)} tokens) and --max-new-tokens ({max_new_tokens}) must each fit "
                           f"the model's context length of {cfg.context_length} tokens")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(1, max(1, max_new_tokens), max_src_len=len(src))
    with eval_mode(list(model.modules())):
        with autocast(device):
            memory = model.encode(torch.tensor([src], device=device))
        next_input = model.start_ids(1, device)
        for i in range(max_new_tokens):
            with autocast(device):
                logits = model.head(model.decode(next_input, memory if i == 0 else None, cache=cache))[0, -1]
            probs = filter_probs(logits, temperature, top_k, top_p).cpu()
            token = _draw(probs, temperature, gen)
            if token in stop_ids:
                return
            yield Step(token, probs)
            next_input = torch.tensor([[token]], device=device)


class Picked(NamedTuple):
    """The token drawn at a step, for `on_candidates`: its text (`Tokenizer.piece`), its rank in the
    distribution it was drawn from (1 = most likely) and its probability there."""

    text: str
    rank: int
    prob: float


def encode_text(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> tuple[list[int], bool]:
    """A source or target as an encoder-decoder reads it: the tokenizer's own special tokens where
    it adds any (T5's `</s>`, BART's `<s> ... </s>`), and always an end-of-text at the end (lmforge's
    tokenizers add none). Cut to `max_len` keeping that end; returns (ids, whether it was cut)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eot_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
    if max_len is not None and len(ids) > max_len:
        return ids[:max_len - 1] + [eos], True
    return ids, False


def read_prompt(tokenizer: Tokenizer, cfg: ModelConfig, prompt: str) -> list[int]:
    """A prompt's ids as the model reads it: with the tokenizer's special tokens (models trained with
    a leading BOS, as Llama, expect one), and an encoder-decoder's source as training read it."""
    if cfg.is_encoder_decoder:
        return encode_text(tokenizer, prompt)[0]
    return tokenizer.encode(prompt, add_special_tokens=True)


def prepare_prompt(tokenizer: Tokenizer, cfg: ModelConfig, prompt: str, max_new_tokens: int | None = None,
                   truncate: str | None = None) -> tuple[list[int], str | None]:
    """Prompt ids that leave room for the answer in the context window, and a note when the prompt
    was cut (else None). Call it before printing anything, so a prompt that cannot fit fails first.

    truncate=None: a prompt that does not fit is an error. "left": keep the prompt's last tokens
    (and a leading BOS the tokenizer adds), leaving room for `max_new_tokens` new ones, or when
    that is None for min(200, context // 2).
    """
    if truncate not in (None, *TRUNCATE):
        raise LMForgeError(f"unknown truncation {truncate!r} (--truncate left keeps the prompt's last tokens)")
    ids = read_prompt(tokenizer, cfg, prompt)
    if not ids:
        raise LMForgeError("the prompt is empty")
    ctx = cfg.context_length
    seq2seq = cfg.is_encoder_decoder  # its answer has the decoder's own positions: the source gets all ctx
    if max_new_tokens is not None and max_new_tokens >= ctx + seq2seq:
        raise LMForgeError(f"--max-new-tokens {max_new_tokens} exceeds the model's context length of {ctx} "
                           "tokens" + ("" if seq2seq else ", leaving no room for the prompt"))
    if len(ids) + (0 if seq2seq else max_new_tokens or 1) <= ctx:
        return ids, None
    room = 0 if seq2seq else max_new_tokens or min(DEFAULT_NEW_TOKENS, ctx // 2)
    if truncate is None:
        why = f"with --max-new-tokens {max_new_tokens} that exceeds" if max_new_tokens else "more than"
        raise LMForgeError(f"the prompt is {len(ids)} tokens; {why} the model's context length of {ctx} "
                           f"(use --truncate left to keep its last {ctx - room} tokens)")
    plain = tokenizer.encode(prompt)
    lead = len(ids) - len(plain) if ids[len(ids) - len(plain):] == plain else 0  # e.g. a BOS: kept
    keep = ctx - room
    if keep <= lead:
        raise LMForgeError(f"--max-new-tokens {room} exceeds the model's context length of {ctx} tokens, "
                           "leaving no room for the prompt")
    cut = len(ids) - keep
    ids = ids[:lead] + ids[lead + cut:]
    return ids, (f"the prompt is {len(ids) + cut} tokens: cut {cut} from its start to fit the model's context "
                 f"length of {ctx} with room for {room} new tokens")


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int | None = None,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: list[str] | None = None, stop_ids: set[int] | None = None,
                  repetition_penalty: float = 1.0, stream: Callable[[str], None] | None = None, top_candidates: int = 0,
                  on_candidates: Callable[[int, list[tuple[str, float]], Picked], None] | None = None,
                  prompt_ids: list[int] | None = None, truncate: str | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, grammar: Grammar | None = None,
                  prefix_cache: PrefixCache | None = None) -> str:
    """The completion of `prompt` (without the prompt), streamed piecewise to `stream` if given.

    Generation ends at an end-of-text token, at a `stop` string (not included), or after
    `max_new_tokens` (default: 200, or what fits in the context window). With `top_candidates` K,
    `on_candidates(step, [(token, prob)...], picked)` sees the K most likely next tokens of the
    distribution each token was drawn from, and the `Picked` token with its rank there (it may lie
    outside the K shown). `prompt_ids` (e.g. from `prepare_prompt`) replace encoding `prompt`;
    otherwise `truncate` is passed to `prepare_prompt` and a cut is reported on stderr. With a
    `grammar` (from `LM.grammar`), only text it allows is drawn, and generation ends when it is complete.
    A `prefix_cache` kept by the caller across calls (same weights) spares recomputing a prompt's
    start that an earlier call saw (a conversation's history, an agent's transcript).
    """
    validate_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    stops = [s for s in (stop or []) if s]
    ids = prompt_ids
    if ids is None:
        ids, note = prepare_prompt(tokenizer, model.cfg, prompt, max_new_tokens, truncate)
        if note:
            print(f"warning: {note}", file=sys.stderr)
    ctx = model.cfg.context_length
    used = 0 if model.cfg.is_encoder_decoder else len(ids)  # the context the prompt takes from the answer
    if max_new_tokens is None:  # not asked for: as much as fits, up to 200
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, ctx - used))
    if used + max_new_tokens > ctx:
        raise LMForgeError(f"--max-new-tokens {max_new_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                           f"model's context length of {ctx} tokens")
    end = {tokenizer.eot_id} if stop_ids is None else stop_ids
    want = top_candidates if on_candidates is not None else 0
    engine = Engine(model, slots=1, max_len=used + max_new_tokens, prefix_cache=prefix_cache)
    handle = engine.submit(Request(ids, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty,
                                   presence_penalty, frequency_penalty, stop=end, logprobs=want, grammar=grammar))
    out = TextStream(tokenizer, stops, hidden_ids(tokenizer, model.cfg.is_encoder_decoder))
    for event in handle:
        if event.finish_reason is not None:
            break
        if want:
            on_candidates(len(out.ids) + 1, *_candidates(tokenizer, event))
        piece = out.add(event.token)
        if stream is not None and piece:
            stream(piece)
        if out.stopped:
            handle.cancel()
            break
    rest = out.flush()
    if stream is not None and rest:
        stream(rest)
    return out.text


def _candidates(tokenizer: Tokenizer, event: Event) -> tuple[list[tuple[str, float]], Picked]:
    ranked = [(tokenizer.piece(t), math.exp(lp)) for t, lp in event.top]
    return ranked, Picked(tokenizer.piece(event.token), event.rank, math.exp(event.logprob))
