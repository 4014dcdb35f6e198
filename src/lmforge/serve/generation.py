"""From an OpenAI request to engine requests and back: prompts, stop strings, logprobs, usage, SSE.

The engine works on token ids in its own thread; each HTTP request turns its events into text
(`TextStream`: whole characters only, stop strings held back) on the event loop. A client that
disconnects has its request cancelled, which frees its engine slots at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..core.errors import LMForgeError
from ..formats.load import Loaded
from ..inference.chat import chat_ids, grammar_for
from ..inference.engine import Engine, Event, Handle
from ..inference.engine import Request as EngineRequest
from ..inference.generate import read_prompt
from ..inference.grammar import Grammar
from ..inference.textstream import TextStream, hidden_ids
from ..text.templates import template_from_json
from ..text.toolcalls import CallStream, Markers, Tool, call_grammar, parse_tool_choice, parse_tools, split_calls
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MAX_EMBED_INPUTS,
    APIError,
    Sampling,
    bad,
    parse_logit_bias,
    parse_messages,
    parse_prompt,
    parse_response_format,
    parse_sampling,
)


@dataclass
class Piece:
    """What one choice gained from a batch of engine events: text (whole characters, stop strings
    held back), logprob entries, tokens generated, and its finish reason when it ended, with what
    stopped it (vLLM's `stop_reason`: the stop token id or the stop string; None otherwise)."""

    index: int
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Shape:
    """What constrains a request's output, and for tool calls how to read them back out of it."""

    grammar: Grammar | None = None
    tools: list[Tool] = field(default_factory=list)
    markers: Markers | None = None  # set when the output may hold tool calls
    logit_bias: dict[int, float] | None = None


RETRY_WINDOW = 60.0  # seconds of finished requests that make the recent rate, for Retry-After
MAX_RETRY_AFTER = 60  # the OpenAI SDKs honour a Retry-After up to 60 s (newer ones 120); beyond, they stop retrying


class Metrics:
    def __init__(self) -> None:
        self.requests = self.errors = self.cancelled = self.prompt_tokens = self.completion_tokens = 0
        self.rejected: Counter[int] = Counter()  # replies refused with an error status (400, 404, 413, 503 ...)


class Backend:
    """The generation endpoints of one loaded model over one engine."""

    completion_fields, chat_fields = COMPLETION_FIELDS, CHAT_FIELDS

    def __init__(self, lm: Loaded, engine: Engine | None, model_name: str, max_queue: int,
                 token_ids: bool = False) -> None:
        self.lm, self.engine, self.model_name, self.max_queue = lm, engine, model_name, max_queue
        self.token_ids = token_ids  # logprobs entries carry each token's id (serve --inspect)
        self.model_lock = threading.Lock()  # without an engine (encoders): embeddings and inspections take turns
        self.loop: asyncio.AbstractEventLoop | None = None
        if engine is not None:  # each engine step's events reach the event loop in one hand-over
            engine.on_step = self._relay
        self.ctx = lm.config.context_length
        self.metrics = Metrics()
        self.finished: deque[float] = deque(maxlen=256)  # when recent requests left the engine (monotonic)
        self.template = None
        if lm.kind.generates:
            self.template = template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
        self.stop_ids = sorted(lm.stop_ids())  # completions stop where `lmforge generate` does
        self.chat_stop_ids = sorted(set(self.stop_ids) | set(self.template.stop_tokens(lm.tokenizer)
                                                              if self.template else []))  # and at end of turn

    # -- requests ------------------------------------------------------------------------------------
    def _require_decoder(self) -> None:
        if self.lm.kind.writes_text and not self.lm.kind.generates:
            raise APIError(400, f"this server holds a {self.lm.kind} (encoder-decoder), which answers a source text "
                           "but has no chat template: use /v1/completions", param="model")
        if not self.lm.kind.generates:
            raise APIError(400, f"this server holds a {self.lm.kind}, which cannot generate text", param="model")

    async def completion(self, body: dict, request: Request):
        if not self.lm.kind.writes_text:
            self._require_decoder()
        s = parse_sampling(body, chat=False)
        prompt = parse_prompt(body)
        if body.get("echo"):
            raise APIError(400, "unsupported field 'echo'", param="echo", code="unsupported_parameter")
        ids = read_prompt(self.lm.tokenizer, self.lm.config, prompt)
        shape = await self._shape(body, chat=False)
        return await self._respond(ids, s, request, chat=False, shape=shape)

    async def chat(self, body: dict, request: Request, raw: bool = False):
        """A chat completion: a Response, or with `raw` the response dict (or an async iterator of
        chunk dicts when streaming), for endpoints that translate it (/v1/responses)."""
        self._require_decoder()
        s = parse_sampling(body, chat=True)
        messages = parse_messages(body)
        shape = await self._shape(body, chat=True)
        ids = self.chat_prompt(messages, shape.tools if shape.markers else None)
        return await self._respond(ids, s, request, chat=True, shape=shape, raw=raw)

    def chat_prompt(self, messages: list[dict], tools: list[Tool] | None = None) -> list[int]:
        """The prompt ids of a chat, in the model's template, ending where the answer begins."""
        try:
            self.template.check(self.lm.tokenizer)
            return chat_ids(self.lm, self.template, messages, tools)
        except LMForgeError as e:
            raise APIError(400, str(e), param="messages") from None

    def exclusive(self) -> contextlib.AbstractContextManager:
        """The model to oneself: between two engine steps, or (no engine) between two embeddings."""
        return self.engine.exclusive() if self.engine is not None else self.model_lock

    # -- constraints ---------------------------------------------------------------------------------
    async def _shape(self, body: dict, chat: bool) -> Shape:
        """The grammar for `response_format` and `tools`/`tool_choice`, compiled (cached) off the loop."""
        schema = parse_response_format(body)
        bias = parse_logit_bias(body)
        tools: list[Tool] = []
        choice, parallel = "none", True
        if chat:
            try:
                tools = parse_tools(body["tools"]) if body.get("tools") else []
            except LMForgeError as e:
                raise bad("tools", str(e)) from None
            try:
                choice = parse_tool_choice(body.get("tool_choice"), tools)
            except LMForgeError as e:
                raise bad("tool_choice", str(e)) from None
            parallel = body.get("parallel_tool_calls")
            if parallel is not None and not isinstance(parallel, bool):
                raise bad("parallel_tool_calls", "'parallel_tool_calls' must be true or false")
            parallel = parallel is not False
        if choice == "none":  # no tools offered: a schema, or free text
            if schema is None:
                return Shape(logit_bias=bias)
            return Shape(await self._compile("response_format", json_schema=schema), logit_bias=bias)
        markers = self.template.tool_markers()
        if markers is None:
            raise bad("tools", f"this model's {self.template.name} chat template cannot express tool calls (chatml "
                               "and templates with Hermes-style <tool_call> markers can)")
        lark = call_grammar(tools, choice, parallel, markers, self.lm.tokenizer, answer=schema)
        grammar = await self._compile("tools", lark=lark)
        return Shape(grammar, tools, markers, bias)

    async def _compile(self, param: str, **grammar) -> Grammar:
        try:  # in a thread: a large schema must not stall every stream in flight
            return await asyncio.to_thread(grammar_for, self.lm, **grammar)
        except LMForgeError as e:
            raise APIError(400, f"invalid or unsupported JSON schema: {e}", param=param, code="invalid_schema") \
                from None

    def _engine_request(self, ids: list[int], s: Sampling, chat: bool, shape: Shape) -> EngineRequest:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        used = 0 if self.lm.config.is_encoder_decoder else len(ids)  # an encoder-decoder answers in its own positions
        if len(ids) > self.ctx or self.ctx - used < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.ctx}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = s.max_tokens if s.max_tokens is not None else min(self.ctx - used, 256)
        if used + max_tokens > self.ctx:
            raise APIError(400, f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed the model's "
                           f"context of {self.ctx} tokens", param="max_tokens", code="context_length_exceeded")
        return EngineRequest(prompt=ids, max_tokens=max_tokens, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, seed=s.seed, repetition_penalty=s.repetition_penalty,
                             presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                             stop=self.chat_stop_ids if chat else self.stop_ids,
                             logprobs=s.top_logprobs if s.logprobs else 0, n=s.n, grammar=shape.grammar,
                             logit_bias=shape.logit_bias)

    def retry_after(self) -> int:
        """Seconds a refused client should wait (Retry-After): the requests queued over the rate at
        which requests left the engine in the last minute (one a second before any has), 1 to 60."""
        now = time.monotonic()
        while self.finished and now - self.finished[0] > RETRY_WINDOW:
            self.finished.popleft()
        rate = len(self.finished) / max(now - self.finished[0], 1.0) if self.finished else 1.0
        waiting = self.engine.waiting() if self.engine is not None else 0
        return max(1, min(MAX_RETRY_AFTER, math.ceil(waiting / rate)))

    def _submit(self, req: EngineRequest) -> Handle:
        """Queue the request in the engine, or refuse it (503) when the queue is full. Synchronous, so
        no other request is checked between this one's check and its submission: the bound holds."""
        if self.engine.waiting() >= self.max_queue:
            raise APIError(503, "the server is busy: too many requests waiting; retry later", type="server_error",
                           code="queue_full")
        self.loop = asyncio.get_running_loop()
        try:
            handle = self.engine.submit(req)
        except LMForgeError as e:
            raise APIError(400, str(e)) from None
        handle.sink = asyncio.Queue()  # before any await: `_deliver` runs on this loop, so it cannot come first
        return handle

    async def _respond(self, ids: list[int], s: Sampling, request: Request, chat: bool, shape: Shape,
                       raw: bool = False):
        req = self._engine_request(ids, s, chat, shape)
        handle = self._submit(req)
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if s.stream:
            chunks = self._chunks(rid, handle, s, chat, len(ids), shape)
            # A stream whose response never starts (its client left first) never runs `_chunks`, whose
            # closing would cancel the request: cancel it when the generator is dropped instead.
            weakref.finalize(chunks, handle.cancel)
            if raw:
                return chunks
            return StreamingResponse(_sse(chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * s.n
        logprobs: list[list[dict]] = [[] for _ in range(s.n)]
        finish: list[str | None] = [None] * s.n
        stopped_by: list[int | str | None] = [None] * s.n
        completion = 0

        async def collect() -> None:
            nonlocal completion
            async with contextlib.aclosing(self._choices(handle, s)) as batches:
                async for batch in batches:
                    for p in batch:
                        texts[p.index] += p.text
                        logprobs[p.index] += p.logprobs
                        completion += p.tokens
                        finish[p.index] = p.finish or finish[p.index]
                        stopped_by[p.index] = p.stop_reason if p.finish else stopped_by[p.index]

        task = asyncio.ensure_future(collect())
        while not task.done():  # a client that hangs up has its request cancelled (the slots freed)
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                handle.cancel()  # also if the task had not started (its closing cancels it otherwise)
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self.metrics.completion_tokens += completion
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        try:
            task.result()
        except RuntimeError as e:
            self.metrics.errors += 1
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            self.metrics.completion_tokens += completion
        choices = [self._choice(i, texts[i], logprobs[i] if s.logprobs else None, finish[i], chat, shape,
                                stopped_by[i]) for i in range(s.n)]
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage}
        return body if raw else JSONResponse(body)

    # -- engine events -> text --------------------------------------------------------------------------
    async def _choices(self, handle: Handle, s: Sampling) -> AsyncIterator[list[Piece]]:
        """The request's output as it arrives: per batch of ready engine events, one `Piece` per
        choice that moved. Closing this generator cancels the request (frees its slots)."""
        req, ready = handle.request, handle.sink
        skip = hidden_ids(self.lm.tokenizer, self.lm.config.is_encoder_decoder)
        streams = [TextStream(self.lm.tokenizer, s.stop, skip) for _ in range(req.n)]
        done = [False] * req.n
        try:
            while not all(done):
                pieces: dict[int, Piece] = {}  # choice -> what it gained in this batch
                for e in await ready.get():
                    i = e.index
                    if done[i]:
                        continue
                    p = pieces.setdefault(i, Piece(i))
                    if e.finish_reason == "error":
                        raise RuntimeError(e.error or "the engine failed")
                    if e.finish_reason is not None:
                        done[i] = True
                        p.text += streams[i].flush()
                        p.finish, p.stop_reason = e.finish_reason, e.stop_token
                        continue
                    p.text += streams[i].add(e.token)
                    p.tokens += 1
                    if s.logprobs:
                        p.logprobs.append(self._logprob_info(e))
                    if streams[i].stopped:  # a stop string: this choice is over (its text ends before it)
                        done[i] = True
                        p.finish, p.stop_reason = "stop", streams[i].stop
                        handle.cancel(i)  # its slot goes back at once; the other choices go on
                if pieces:
                    yield list(pieces.values())
        finally:
            self.finished.append(time.monotonic())
            if not all(done):  # the client went away (or an error): free its slots now
                self.metrics.cancelled += 1
                handle.cancel()

    def _logprob_info(self, e) -> dict:
        tok = self.lm.tokenizer
        top = [{"token": tok.decode([t]), "logprob": _finite(lp), "bytes": list(tok.raw_bytes(t))}
               for t, lp in (e.top or [])]
        info = {"token": tok.decode([e.token]), "logprob": _finite(e.logprob), "bytes": list(tok.raw_bytes(e.token)),
                "top_logprobs": top}
        if self.token_ids:  # the exact ids, for POST /inspect's continuation
            info["token_id"] = e.token
        return info

    def _choice(self, i: int, text: str, logprobs: list[dict] | None, finish: str | None, chat: bool,
                shape: Shape, stop_reason: int | str | None = None) -> dict:
        if chat:
            lp = {"content": logprobs} if logprobs is not None else None
            message: dict = {"role": "assistant", "content": text}
            if shape.markers is not None:
                content, calls = split_calls(text, shape.markers, shape.tools)
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [c.to_json() for c in calls]}
                    finish = "tool_calls" if finish == "stop" else finish
            return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason}
        lp = None
        if logprobs is not None:
            lp = {"tokens": [x["token"] for x in logprobs], "token_logprobs": [x["logprob"] for x in logprobs],
                  "top_logprobs": [{t["token"]: t["logprob"] for t in x["top_logprobs"]} for x in logprobs]}
            if self.token_ids:
                lp["token_ids"] = [x["token_id"] for x in logprobs]
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason}

    async def _chunks(self, rid: str, handle: Handle, s: Sampling, chat: bool, prompt_tokens: int,
                      shape: Shape) -> AsyncIterator[dict]:
        """The streamed response as chunk dicts (an error mid-stream becomes a last {"error": ...}).
        With tools, text streams until a call may be starting; each call then comes whole, as one
        `delta.tool_calls` entry, so the deltas assemble into exactly the non-streamed calls."""
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
        completion = 0
        n = handle.request.n
        calls = [CallStream(shape.markers, shape.tools) for _ in range(n)] if chat and shape.markers else None

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            body = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)])
            async with contextlib.aclosing(self._choices(handle, s)) as batches:
                async for batch in batches:  # what is ready goes out together: one chunk per choice
                    for p in batch:
                        completion += p.tokens
                        lp = p.logprobs if s.logprobs else None
                        if not chat:
                            if p.text or p.finish is not None or p.logprobs:
                                yield chunk([self._choice(p.index, p.text, lp, p.finish, False, shape,
                                                          p.stop_reason)])
                            continue
                        text, made, finish = p.text, [], p.finish
                        if calls is not None:
                            text = calls[p.index].add(p.text)
                            if p.finish is not None:
                                rest, made = calls[p.index].finish()
                                text += rest
                                finish = "tool_calls" if made and finish == "stop" else finish
                        if text or lp:
                            yield chunk([{"index": p.index, "delta": {"content": text} if text else {},
                                          "logprobs": {"content": lp} if lp else None, "finish_reason": None}])
                        if made:
                            yield chunk([{"index": p.index, "delta": {"tool_calls": [
                                {"index": k, **c.to_json()} for k, c in enumerate(made)]}, "logprobs": None,
                                "finish_reason": None}])
                        if finish is not None:
                            yield chunk([{"index": p.index, "delta": {}, "logprobs": None, "finish_reason": finish,
                                          "stop_reason": p.stop_reason}])
            if s.include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion})
        except Exception as e:  # mid-stream: the status line is gone, so the error travels as data
            self.metrics.errors += 1
            yield APIError(500, f"generation failed: {e}", type="server_error").body()
        finally:
            self.metrics.completion_tokens += completion

    def _relay(self, batch: list[tuple[Handle, Event]]) -> None:
        """In the engine's thread, after each step: hand its events to the event loop at once."""
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down): nobody is reading
            self.loop.call_soon_threadsafe(_deliver, batch)

    # -- embeddings, metrics ---------------------------------------------------------------------------
    async def embeddings(self, body: dict):
        from ..inference.embed import embed_texts

        if not self.lm.kind.is_encoder:
            raise APIError(400, f"this server holds a {self.lm.kind}; embeddings need an encoder", param="model")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) \
                or len(texts) > MAX_EMBED_INPUTS:
            raise APIError(400, f"'input' must be a non-empty string or a list of up to {MAX_EMBED_INPUTS} of them",
                           param="input")
        if body.get("encoding_format", "float") != "float":
            raise APIError(400, "only encoding_format 'float' is supported", param="encoding_format")

        def embed():
            with self.model_lock:
                return embed_texts(self.lm, texts)

        try:
            vectors = await asyncio.to_thread(embed)
        except LMForgeError as e:
            raise APIError(400, str(e), param="input") from None
        n = sum(len(self.lm.tokenizer.encode(t)) for t in texts)
        return {"object": "list", "model": self.model_name, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    def metrics_text(self, uptime: float) -> str:
        m, e = self.metrics, self.engine
        waiting, active = (e.waiting(), e.active()) if e is not None else (0, 0)
        rows = [("lmforge_requests_total", "counter", m.requests), ("lmforge_errors_total", "counter", m.errors),
                ("lmforge_cancelled_total", "counter", m.cancelled),
                ("lmforge_prompt_tokens_total", "counter", m.prompt_tokens),
                ("lmforge_completion_tokens_total", "counter", m.completion_tokens),
                ("lmforge_queue_depth", "gauge", waiting), ("lmforge_active_slots", "gauge", active),
                ("lmforge_completion_tokens_per_second", "gauge", round(m.completion_tokens / max(uptime, 1e-9), 3))]
        cache = e.prefix_cache if e is not None else None
        if cache is not None:  # read without the engine's lock: a scrape may be one step behind
            st = cache.stats
            rows += [("lmforge_prefix_cache_hit_rate", "gauge", round(st.hit_rate, 4)),
                     ("lmforge_prefix_cache_hit_tokens_total", "counter", st.hit_tokens),
                     ("lmforge_prefix_cache_prompt_tokens_total", "counter", st.prompt_tokens),
                     ("lmforge_prefix_cache_cached_tokens", "gauge", len(cache) * cache.block),
                     ("lmforge_prefix_cache_bytes", "gauge", cache.bytes),
                     ("lmforge_prefix_cache_evicted_blocks_total", "counter", st.evicted_blocks)]
        text = "".join(f"# TYPE {name} {kind}\n{name} {value}\n" for name, kind, value in rows)
        text += "# TYPE lmforge_rejected_total counter\n"  # by status: bad requests as well as failed generations
        return text + "".join(f'lmforge_rejected_total{{status="{status}"}} {n}\n'
                              for status, n in sorted(m.rejected.items()))


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async with contextlib.aclosing(chunks):
        async for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            if "error" in c:
                return
    yield "data: [DONE]\n\n"


def _deliver(batch: list[tuple[Handle, Event]]) -> None:
    """On the event loop: each request's events of one engine step, as one list, to its queue."""
    mine: dict[Handle, list[Event]] = {}
    for handle, event in batch:
        mine.setdefault(handle, []).append(event)
    for handle, events in mine.items():
        if handle.sink is not None:
            handle.sink.put_nowait(events)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI clients expect a number
