"""`lmforge serve`: an OpenAI-compatible HTTP API over the shared inference engine.

Endpoints: GET /health, GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions
(tools, response_format), POST /v1/responses (stateless), POST /v1/embeddings (encoders),
POST /tokenize, GET /metrics (Prometheus text), GET /openapi.json (the request bodies' schemas: openapi.py),
and for the chat page at GET /:
GET /v1/lmforge/config, POST /v1/lmforge/feedback (compare-mode votes) and, with --inspect,
POST /inspect (one layer's attention weights over a sequence: serve/inspect.py). Unknown paths and
methods get OpenAI-shaped 404s and 405s.
Bodies are untrusted: size-limited (413), validated field by field (400 naming the field), and
answered with OpenAI's error shape. An API key, when set, is compared in constant time (401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from ..core.fileio import append_line
from ..formats.load import Loaded
from . import openapi
from .generation import Backend
from .inspect import FIELDS as INSPECT_FIELDS
from .inspect import Inspector
from .protocol import MAX_FEEDBACK_TEXT, APIError, check_fields, parse_messages
from .responses import stream_events, to_chat, to_response

OPEN_PATHS = {"/health", "/", "/favicon.ico"}  # the page itself holds nothing; its API calls carry the key
PAGE = Path(__file__).with_name("static") / "chat.html"


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body: int = 1 << 20
    max_queue: int = 64
    feedback: str | None = None  # JSONL file that the page's compare mode appends preferences to
    inspect: bool = False  # POST /inspect answers (attention weights), and logprobs carry token ids


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, refusing more than `limit` bytes (413) whatever Content-Length claims.
    Only `application/json`: a page on another origin can send a form or text/plain POST without
    asking the browser's permission (no CORS preflight), but not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "send the body as JSON (Content-Type: application/json)", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def validate_feedback(body: dict) -> dict:
    """One preference record, in the alignment reader's format."""
    record: dict = {}
    if "messages" in body:
        record["messages"] = parse_messages(body)
    elif isinstance(body.get("prompt"), str) and body["prompt"]:
        record["prompt"] = body["prompt"]
    else:
        raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
    for name in ("chosen", "rejected"):
        value = body.get(name)
        if not isinstance(value, str) or len(value) > MAX_FEEDBACK_TEXT:
            raise APIError(400, f"'{name}' must be a string of at most {MAX_FEEDBACK_TEXT} characters", param=name)
        record[name] = value
    if body.get("tie") is not None:
        if not isinstance(body["tie"], bool):
            raise APIError(400, "'tie' must be true or false", param="tie")
        record["tie"] = body["tie"]
    return record


class KeyGuard:
    """401 unless `Authorization: Bearer KEY` matches (compared in constant time); /health and the
    page stay open. Plain ASGI, not BaseHTTPMiddleware: that one relays every streamed chunk through
    a memory stream and hides a client's disconnect from the route."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                response = error_response(APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                   type="authentication_error", code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ResponseCounter:
    """Counts every reply by route and status (`lmforge_http_responses_total`), so a load test can check
    what it sent against what the server answered. Plain ASGI, outermost: 401s, 404s and a client's
    499 are counted too. The route is the matched template (or "other"): a label per raw path would
    let clients grow /metrics without bound."""

    def __init__(self, app, counts: Counter, routes: list[BaseRoute]) -> None:
        self.app, self.counts, self.routes = app, counts, routes

    def route(self, scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
            partial = partial or (route.path if match == Match.PARTIAL else None)  # the wrong method: 405
        return partial or "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception that escapes becomes Starlette's 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counts[self.route(scope), status] += 1


def responses_text(counts: Counter) -> str:
    return "# TYPE lmforge_http_responses_total counter\n" + "".join(
        f'lmforge_http_responses_total{{path="{path}",status="{status}"}} {n}\n'
        for (path, status), n in sorted(counts.items()))


def create_app(lm: Loaded, cfg: ServeConfig, backend: Backend) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url="/openapi.json", responses=openapi.ERRORS)
    name = cfg.model_name
    started = time.time()
    # a thread, not the awaiting request, holds it: a client that hangs up cannot let two appends overlap
    feedback_lock = threading.Lock()

    if cfg.cors_origins:  # same-origin only unless asked: no CORS headers at all by default
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    if cfg.api_key:
        app.add_middleware(KeyGuard, key=cfg.api_key)
    responses_by_status: Counter[tuple[str, int]] = Counter()
    app.add_middleware(ResponseCounter, counts=responses_by_status, routes=app.router.routes)  # added last: outermost

    def refuse(e: APIError) -> JSONResponse:
        """The error reply, counted; every 503 says when to come back (the OpenAI SDKs wait that long)."""
        backend.metrics.rejected[e.status] += 1
        response = error_response(e)
        if e.status == 503:
            response.headers["Retry-After"] = str(backend.retry_after())
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return refuse(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # FastAPI's own 404/405, in OpenAI's shape
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        response = refuse(APIError(e.status_code, what, code={404: "not_found", 405: "method_not_allowed"}
                                   .get(e.status_code)))
        for k, v in (e.headers or {}).items():  # e.g. 405's Allow
            response.headers[k] = v
        return response

    async def body_of(request: Request, allowed: set[str]) -> dict:
        return known_model(check_fields(await read_json(request, cfg.max_body), allowed))

    def known_model(body: dict) -> dict:
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise APIError(400, f"unknown model {model!r} (this server has {cfg.model_name!r})", param="model",
                           code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(started),
                                            "owned_by": "lmforge"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"unknown model {model_id!r} (this server has {cfg.model_name!r})", param="model",
                           code="model_not_found")
        return {"id": cfg.model_name, "object": "model", "created": int(started), "owned_by": "lmforge"}

    @app.post("/tokenize", openapi_extra=openapi.body(openapi.tokenize_body(name)))
    async def tokenize(request: Request):
        body = await body_of(request, {"model", "prompt", "text"})
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        ids = lm.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": lm.config.context_length}

    @app.post("/v1/completions", openapi_extra=openapi.body(openapi.completion_body(name)))
    async def completions(request: Request):
        body = await body_of(request, backend.completion_fields)
        return await backend.completion(body, request)

    @app.post("/v1/chat/completions", openapi_extra=openapi.body(openapi.chat_body(name)))
    async def chat_completions(request: Request):
        body = await body_of(request, backend.chat_fields)
        return await backend.chat(body, request)

    @app.post("/v1/responses", openapi_extra=openapi.body(openapi.responses_body(name)))
    async def responses(request: Request):
        """The Responses API, stateless: translated to a chat completion and back."""
        raw = await read_json(request, cfg.max_body)
        chat = to_chat(raw)
        body = known_model(check_fields(chat, backend.chat_fields))
        result = await backend.chat(body, request, raw=True)
        if isinstance(result, Response):  # the client went away
            return result
        if isinstance(result, dict):
            return JSONResponse(to_response(result, raw))
        return StreamingResponse(stream_events(result, raw), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/embeddings", openapi_extra=openapi.body(openapi.embeddings_body(name)))
    async def embeddings(request: Request):
        body = await body_of(request, {"model", "input", "encoding_format", "user"})
        return await backend.embeddings(body)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(backend.metrics_text(time.time() - started) + responses_text(responses_by_status),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/")
    async def page():
        """The chat page: one static file, no CDN, no build step."""
        if not PAGE.exists():
            raise APIError(404, "the chat page is not installed", code="not_found")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/v1/lmforge/config")
    async def page_config():
        """What the page needs to know: the model, its context, whether compare mode can record."""
        shape = {"n_layer": lm.config.n_layer, "n_head": lm.config.n_head}
        return {"model": cfg.model_name, "context_length": lm.config.context_length,
                "feedback": cfg.feedback is not None, "kind": str(lm.kind),
                "inspect": shape if cfg.inspect and not lm.config.is_encoder_decoder else None}  # the page's rows

    inspector = Inspector(backend)
    mc = lm.config

    # Off, the route answers a 404 that says how to turn it on, and stays out of the OpenAPI document
    # (which describes what this server does).
    @app.post("/inspect", include_in_schema=cfg.inspect, openapi_extra=openapi.body(openapi.inspect_body(
        name, mc.vocab_size, mc.context_length, mc.n_layer, mc.n_head)))
    async def inspect_attention(request: Request):
        """One layer's attention weights (one head's or their mean) over a sequence of tokens."""
        if not cfg.inspect:
            raise APIError(404, "attention inspection is off: start the server with --inspect", code="not_found")
        return await inspector(await body_of(request, INSPECT_FIELDS))

    @app.post("/v1/lmforge/feedback", openapi_extra=openapi.body(openapi.feedback_body()))
    async def feedback(request: Request):
        """Compare mode: append {"prompt" or "messages", "chosen", "rejected"} (or a tie) to --feedback."""
        if cfg.feedback is None:
            raise APIError(404, "this server records no feedback (start it with --feedback FILE)",
                           code="not_found")
        body = check_fields(await read_json(request, cfg.max_body),
                            {"model", "prompt", "messages", "chosen", "rejected", "tie"})
        record = validate_feedback(body)
        # ASCII: no U+2028 or other character that a reader's splitlines() would take for a line break
        line = json.dumps(record)

        def write() -> None:  # whole or absent even under kill -9 (append_line); one at a time
            with feedback_lock:
                append_line(cfg.feedback, line, fsync=True)

        await asyncio.to_thread(write)  # off the event loop: a long line rewrites the file
        return {"ok": True}

    return app
