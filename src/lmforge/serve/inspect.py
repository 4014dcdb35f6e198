"""POST /inspect (`serve --inspect`): one layer's attention weights over a sequence, for the chat page.

The sequence is given as token ids, as text (tokenized as /v1/completions tokenizes a prompt) or as
chat messages (in the chat template, as /v1/chat/completions renders them), optionally followed by
`continuation` ids: the tokens a completion generated, which a server started with --inspect
returns in each logprobs entry as `token_id`. So the weights are the model's on exactly the tokens
it read and wrote, not on a re-tokenized text. The forward runs under the engine's lock
(`Engine.exclusive`): inspection changes the shared model's attention layers for one forward.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..core.errors import LMForgeError
from ..formats.load import Loaded
from ..inference.inspect import attention_rows, pieces
from .generation import Backend
from .protocol import APIError, _number, bad, parse_messages

FIELDS = {"model", "tokens", "text", "messages", "continuation", "layer", "head", "start"}
DECIMALS = 6  # of each weight in the reply: plenty for shading, and half the JSON of full floats
# Bounds on untrusted work: explicit weights are [heads, T, T] floats for the layer asked, and the
# engine holds still meanwhile; a few may wait their turn, more are refused with a 503.
MAX_TOKENS = 1024
MAX_WAITING = 4


@dataclass
class InspectRequest:
    ids: list[int]
    prompt_tokens: int  # how many of `ids` came from tokens/text/messages (the rest: continuation)
    layer: int
    head: int | None  # None: the mean over heads
    start: int  # the first query position whose row is returned


def _ids(value: object, name: str, vocab: int, context: int) -> list[int]:
    if not isinstance(value, list) or len(value) > context or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in value):
        raise bad(name, f"'{name}' must be a list of at most {context} token ids in 0..{vocab - 1}")
    return value


def parse_inspect(body: dict, backend: Backend) -> InspectRequest:
    """The request's token ids, layer, head and first row, validated against the model (400s)."""
    lm = backend.lm
    cfg = lm.config
    given = [k for k in ("tokens", "text", "messages") if k in body]
    if len(given) != 1:
        raise APIError(400, "give exactly one of 'tokens' (token ids), 'text' and 'messages'", param="tokens")
    if given == ["tokens"]:
        ids = _ids(body["tokens"], "tokens", cfg.vocab_size, cfg.context_length)
    elif given == ["text"]:
        if not isinstance(body["text"], str):
            raise bad("text", "'text' must be a string")
        ids = lm.tokenizer.encode(body["text"], add_special_tokens=True)  # as /v1/completions reads a prompt
    else:
        if backend.template is None:
            raise bad("messages", f"this server holds a {lm.kind}, which has no chat template: send 'tokens' or "
                                  "'text'")
        ids = backend.chat_prompt(parse_messages(body))
    prompt = len(ids)
    more = body.get("continuation")
    ids = ids + ([] if more is None else _ids(more, "continuation", cfg.vocab_size, cfg.context_length))
    if not ids:
        raise bad(given[0], "nothing to inspect: the sequence is empty")
    if len(ids) > cfg.context_length:
        raise APIError(400, f"the sequence is {len(ids)} tokens; the model's context is {cfg.context_length}",
                       param=given[0], code="context_length_exceeded")
    if len(ids) > MAX_TOKENS:
        raise APIError(400, f"the sequence is {len(ids)} tokens; /inspect reads at most {MAX_TOKENS}",
                       param=given[0], code="context_length_exceeded")
    layer = _number(body, "layer", 0, cfg.n_layer - 1, cfg.n_layer - 1, integer=True)
    head = _number(body, "head", 0, cfg.n_head - 1, None, integer=True)
    start = _number(body, "start", -len(ids), len(ids) - 1, 0, integer=True)
    return InspectRequest(ids, prompt, layer, head, start + len(ids) if start < 0 else start)


def compute(lm: Loaded, backend: Backend, r: InspectRequest) -> dict:
    """Blocking: the weights, with the model held (no engine step runs meanwhile)."""
    try:
        with backend.exclusive():
            rows = attention_rows(lm, r.ids, r.layer, r.head, r.start)
    except LMForgeError as e:
        raise APIError(400, str(e)) from None
    scale = 10.0 ** DECIMALS
    return {"object": "attention", "model": backend.model_name, "ids": r.ids,
            "tokens": pieces(lm, r.ids), "prompt_tokens": r.prompt_tokens,
            "n_layer": lm.config.n_layer, "n_head": lm.config.n_head, "layer": r.layer, "head": r.head,
            "start": r.start, "attention": ((rows.double() * scale).round() / scale).tolist()}


class Inspector:
    """One inspection at a time: requests wait their turn on the event loop, not in a worker thread
    each (a burst would otherwise tie up the thread pool that embeddings and grammars use)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.turn = asyncio.Lock()
        self.waiting = 0  # requests holding or waiting for the turn

    async def __call__(self, body: dict) -> dict:
        r = parse_inspect(body, self.backend)
        if self.waiting >= MAX_WAITING:
            raise APIError(503, "the server is busy: too many inspections waiting; retry later", type="server_error",
                           code="server_busy")
        self.waiting += 1
        try:
            async with self.turn:
                return await asyncio.to_thread(compute, self.backend.lm, self.backend, r)
        finally:
            self.waiting -= 1
