"""The OpenAI Responses API (`POST /v1/responses`) as a stateless translation over Chat Completions.

`to_chat` turns a Responses request into a Chat Completions body; `to_response` and `stream_events` turn the chat
answer (whole, or as stream chunks) back into a Responses object or its server-sent events. lmforge keeps no
responses, so `previous_response_id`, `conversation` and `store: true` are refused, as are hosted tools (web search,
file search, computer use) and any input that is not text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .protocol import APIError

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
NUMBER = (int, float)
# Every field taken, with its type; the second group is accepted and ignored: none can change what the model writes
# (the values that would, e.g. `store: true`, are refused in to_chat).
FIELDS: dict[str, Any] = {
    "model": str, "input": (str, list), "instructions": str, "tools": list, "tool_choice": (str, dict),
    "parallel_tool_calls": bool, "text": dict, "max_output_tokens": int, "temperature": NUMBER, "top_p": NUMBER,
    "stream": bool,
    "metadata": dict, "user": str, "service_tier": str, "truncation": str, "include": list, "reasoning": dict,
    "prompt_cache_key": str, "prompt_cache_retention": str, "prompt_cache_options": dict, "safety_identifier": str,
    "store": bool, "background": bool, "stream_options": dict, "top_logprobs": int, "previous_response_id": str,
    "conversation": (str, dict)}
WHAT = {str: "a string", list: "a list", dict: "an object", bool: "true or false", int: "an integer",
        NUMBER: "a number", (str, list): "a string or a list", (str, dict): "a string or an object"}
STATELESS = "lmforge keeps no responses: send the whole conversation in 'input'"


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _get(obj: dict, key: str, types: Any, param: str | None = None, required: bool = False) -> Any:
    """obj[key] if it is of `types` (a bool is no number), None if absent or null and not required, else a 400."""
    value, param = obj.get(key), param or key
    if value is None and not required:
        return None
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise _bad(param, f"'{param}' must be {WHAT[types]}")
    return value


def _string(obj: dict, key: str, at: str) -> str:
    return _get(obj, key, str, f"{at}.{key}", required=True)


def _text(content: Any, param: str) -> str:
    """A string, or the text parts of a content list joined; any other part type is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, f"'{param}' must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise _bad(f"{param}[{j}].type", f"content part type {kind!r} is not supported: lmforge takes text only",
                       code="unsupported_value")
        texts.append(_string(part, "text", f"{param}[{j}]"))
    return "".join(texts)


def _messages(items: Any) -> list[dict]:
    """Responses `input` as chat messages; function calls join the assistant message they follow."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, f"'{at}' must be an object")
        kind = item.get("type") or "message"
        if kind == "message":
            if item.get("role") not in ROLES:
                raise _bad(f"{at}.role", f"'{at}.role' must be one of {', '.join(ROLES)}")
            out.append({"role": item["role"], "content": _text(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", at), "type": "function",
                    "function": {"name": _string(item, "name", at), "arguments": _string(item, "arguments", at)}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", at),
                        "content": _text(item.get("output"), f"{at}.output")})
        elif kind != "reasoning":  # reasoning items (another model's) carry nothing lmforge can use
            raise _bad(f"{at}.type", f"input item type {kind!r} is not supported", code="unsupported_value")
    return out


def _tools(tools: list) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _bad(f"{at}.type", f"tool type {kind!r} is not supported: lmforge serves function tools only",
                       code="unsupported_value")
        fn = {"name": _string(tool, "name", at)}
        for key, types in (("description", str), ("parameters", dict), ("strict", bool)):
            if (value := _get(tool, key, types, f"{at}.{key}")) is not None:
                fn[key] = value
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, names: set[str]) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if choice["name"] not in names:
            raise _bad("tool_choice", f"'tool_choice' names {choice['name']!r}, which is not among 'tools'")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}")


def _response_format(text: dict) -> dict | None:
    if unknown := sorted(set(text) - {"format", "verbosity"}):
        raise _bad(f"text.{unknown[0]}", f"unsupported field 'text.{unknown[0]}'", code="unsupported_parameter")
    if text.get("verbosity") not in (None, "low", "medium", "high"):
        raise _bad("text.verbosity", "'text.verbosity' must be 'low', 'medium' or 'high'")
    fmt = _get(text, "format", dict, "text.format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format.type", "'text.format.type' must be 'text', 'json_schema' or 'json_object'")
    schema = {"name": _string(fmt, "name", "text.format"),
              "schema": _get(fmt, "schema", dict, "text.format.schema", required=True)}
    for key, types in (("description", str), ("strict", bool)):
        if (value := _get(fmt, key, types, f"text.format.{key}")) is not None:
            schema[key] = value
    return {"type": "json_schema", "json_schema": schema}


def to_chat(body: Any) -> dict:
    """An equivalent Chat Completions body for a Responses request (a 400 naming the field it cannot take)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if unknown := sorted(set(body) - set(FIELDS)):
        raise APIError(400, f"unsupported field '{unknown[0]}'", param=unknown[0], code="unsupported_parameter")
    for key, types in FIELDS.items():
        _get(body, key, types)
    for key in ("previous_response_id", "conversation", "store"):
        if body.get(key):
            raise APIError(400, f"{STATELESS} (and leave out '{key}')", param=key, code="unsupported_parameter")
    for key, ok, why in (("background", False, "false"), ("truncation", "disabled", "'disabled'"),
                         ("top_logprobs", 0, "0: logprobs are on /v1/chat/completions")):
        if body.get(key) not in (None, ok):
            raise _bad(key, f"'{key}' must be {why}")
    metadata = body.get("metadata") or {}
    if not all(isinstance(s, str) for s in [*metadata, *metadata.values()]):
        raise _bad("metadata", "'metadata' must be an object of strings")
    if body.get("input") is None:
        raise _bad("input", "'input' is required", code="missing_required_parameter")
    system = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    chat: dict[str, Any] = {"model": body["model"]} if body.get("model") is not None else {}
    chat["messages"] = system + _messages(body["input"])
    if not chat["messages"]:
        raise _bad("input", "'input' must hold at least one message")
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"], {t["function"]["name"] for t in chat.get("tools", [])})
    if body.get("text") and (fmt := _response_format(body["text"])):
        chat["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        if body["max_output_tokens"] < 1:
            raise _bad("max_output_tokens", "'max_output_tokens' must be at least 1")
        chat["max_tokens"] = body["max_output_tokens"]
    chat |= {key: body[key] for key in ("temperature", "top_p") if body.get(key) is not None}
    if body.get("stream"):
        chat["stream"], chat["stream_options"] = True, {"include_usage": True}
    return chat


# ---- chat answers back into Responses objects: one builder for both the whole and the streamed answer ----

def _base(chat_id: Any) -> str:
    """The id every object of one response derives from, so a streamed and a whole answer agree."""
    return str(chat_id).removeprefix("chatcmpl-") if chat_id else uuid.uuid4().hex


def _message_item(base: str, n: int, text: str, status: str) -> dict:
    return {"id": f"msg_{base}" + (f"_{n}" if n else ""), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(base: str, n: int, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": f"fc_{base}_{n}", "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _status(finish_reason: Any) -> tuple[str, dict | None]:
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def _usage(usage: Any) -> dict | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage.get("total_tokens", prompt + completion)}


def _response(request: dict, base: str, created: Any, model: Any, output: list[dict], status: str,
              incomplete: dict | None = None, usage: dict | None = None, error: dict | None = None) -> dict:
    """The Responses object, echoing the request's settings as OpenAI does."""
    return {"id": f"resp_{base}", "object": "response", "created_at": created, "status": status, "error": error,
            "incomplete_details": incomplete, "model": model or request.get("model") or "", "output": output,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
            "temperature": request.get("temperature"), "top_p": request.get("top_p"),
            "tool_choice": request.get("tool_choice") or "auto", "tools": request.get("tools") or [],
            "text": request.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "metadata": request.get("metadata") or {}, "store": False, "background": False,
            "previous_response_id": None, "user": request.get("user"), "usage": usage}


def to_response(chat: dict, request: dict) -> dict:
    """The Responses object for a whole (non-streamed) Chat Completions answer to `to_chat(request)`."""
    choice = (chat.get("choices") or [{}])[0]
    message, base = choice.get("message") or {}, _base(chat.get("id"))
    status, incomplete = _status(choice.get("finish_reason"))
    calls = message.get("tool_calls") or []
    output = [_message_item(base, 0, message.get("content") or "", "completed")] \
        if message.get("content") or not calls else []
    output += [_call_item(base, n, c["id"], c["function"]["name"], c["function"]["arguments"], "completed")
               for n, c in enumerate(calls)]
    output[-1]["status"] = "incomplete" if status == "incomplete" else "completed"
    return _response(request, base, chat.get("created") or int(time.time()), chat.get("model"), output, status,
                     incomplete, _usage(chat.get("usage")))


def _sse(kind: str, seq: int, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"


class _Stream:
    """One streamed response: its output items (one open at a time, the next closing it) and the events so far."""

    def __init__(self, request: dict, chunk: dict) -> None:
        self.request, self.seq, self.items, self.open = request, 0, [], None
        self.base, self.model = _base(chunk.get("id")), chunk.get("model")
        self.created = chunk.get("created") or int(time.time())
        self.calls: dict[int, int] = {}  # chat tool-call index -> output index
        self.messages, self.finish_reason, self.usage = 0, None, None

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return _sse(kind, self.seq - 1, **fields)

    def snapshot(self, status: str, **extra: Any) -> dict:
        return _response(self.request, self.base, self.created, self.model, self.items, status, **extra)

    def start(self) -> list[str]:
        response = self.snapshot("in_progress")
        return [self.event(f"response.{kind}", response=response) for kind in ("created", "in_progress")]

    def close(self, status: str = "completed") -> list[str]:
        if self.open is None:
            return []
        i, item = self.open, self.items[self.open]
        self.open, item["status"] = None, status
        if item["type"] == "message":
            part, at = item["content"][0], {"item_id": item["id"], "output_index": i, "content_index": 0}
            done = [self.event("response.output_text.done", **at, text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", **at, part=part)]
        else:
            done = [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                               arguments=item["arguments"])]
        return done + [self.event("response.output_item.done", output_index=i, item=item)]

    def add(self, item: dict, shown: dict) -> list[str]:
        out = self.close()
        self.open = len(self.items)
        self.items.append(item)
        return out + [self.event("response.output_item.added", output_index=self.open, item=shown)]

    def add_message(self) -> list[str]:
        item = _message_item(self.base, self.messages, "", "in_progress")
        self.messages += 1
        return self.add(item, {**item, "content": []}) + [self.event(
            "response.content_part.added", item_id=item["id"], output_index=self.open, content_index=0,
            part={"type": "output_text", "text": "", "annotations": []})]

    def text(self, delta: str) -> list[str]:
        out = [] if self.open is not None and self.items[self.open]["type"] == "message" else self.add_message()
        item = self.items[self.open]
        item["content"][0]["text"] += delta
        return out + [self.event("response.output_text.delta", item_id=item["id"], output_index=self.open,
                                 content_index=0, delta=delta, logprobs=[])]

    def tool(self, call: dict) -> list[str]:
        index, fn, out = call.get("index", 0), call.get("function") or {}, []
        if index not in self.calls:
            n = len(self.calls)
            name, call_id = fn.get("name") or "", call.get("id") or f"call_{self.base}_{n}"
            item = _call_item(self.base, n, call_id, name, "", "in_progress")
            out = self.add(item, item)  # events are written out at once: `shown` is the item as it is now
            self.calls[index] = self.open
        at, item = self.calls[index], self.items[self.calls[index]]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                                  delta=fn["arguments"]))
        return out

    def feed(self, chunk: dict) -> list[str]:
        self.usage = chunk.get("usage") or self.usage
        out = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self.tool(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return out

    def end(self) -> list[str]:
        status, incomplete = _status(self.finish_reason)
        out = [] if self.items else self.add_message()  # an empty answer is still one (empty) message
        out += self.close("incomplete" if status == "incomplete" else "completed")
        response = self.snapshot(status, incomplete=incomplete, usage=_usage(self.usage))
        return out + [self.event(f"response.{status}", response=response)]


async def stream_events(chunks: AsyncIterator[dict], request: dict) -> AsyncIterator[str]:
    """Server-sent Responses events for a streamed Chat Completions answer to `to_chat(request)`.

    An error chunk ends the stream: with `error` before anything began, else with `response.failed`."""
    stream: _Stream | None = None
    async for chunk in chunks:
        if (error := chunk.get("error")) is not None:
            error = error if isinstance(error, dict) else {"message": str(error)}
            message = str(error.get("message") or "generation failed")
            if stream is None:
                yield _sse("error", 0, code=error.get("code"), param=error.get("param"), message=message)
            else:
                failure = {"code": "server_error", "message": message}
                yield stream.event("response.failed", response=stream.snapshot("failed", error=failure))
            return
        events = [] if stream else (stream := _Stream(request, chunk)).start()
        for event in events + stream.feed(chunk):
            yield event
    events = [] if stream else (stream := _Stream(request, {})).start()
    for event in events + stream.end():
        yield event
