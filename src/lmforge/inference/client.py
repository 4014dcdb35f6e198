"""One way to ask a model for text, whether it is a local directory or an OpenAI-compatible server.

RAG answers, agents, evaluation and judging call a `Generator`: `LocalGenerator` runs a loaded model
through the engine; `RemoteGenerator` speaks OpenAI's HTTP API (`lmforge serve`, llama.cpp's server,
vLLM, Ollama). For the same model both give the same text at temperature 0, since `lmforge serve`
encodes prompts and renders chats exactly as the local path does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

from ..core.errors import LMForgeError
from ..formats.load import Loaded
from ..text.templates import template_from_json
from .chat import chat_ids, chat_setup, reply
from .generate import generate_text
from .prefix_cache import PrefixCache

MAX_TEXT = 1_000_000  # characters: a server's answer is untrusted, and a runaway one is cut off


class Generator(Protocol):
    """Text in, text out. `on_text` receives the answer piecewise as it is generated; `stop`
    strings end it (not included); temperature 0 is greedy."""

    name: str

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, stop: Sequence[str] = (),
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str: ...

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: Sequence[str] = (), seed: int | None = None,
             on_text: Callable[[str], None] | None = None) -> str: ...

    def chat_tools(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None) -> dict | None:
        """The assistant's message (OpenAI's shape, "tool_calls" included) to `messages` with
        OpenAI `tools` offered; None when the model cannot call tools natively."""
        ...


class LocalGenerator:
    """A loaded decoder (`formats.load.load_model`) behind the `Generator` interface. `max_tokens`
    is cut to what fits in the context window; a prompt that alone does not fit is an error."""

    def __init__(self, lm: Loaded) -> None:
        if not lm.kind.generates:
            raise LMForgeError(f"{lm.path} is {lm.kind.phrase}, not a model that generates text")
        self.lm, self.name = lm, str(lm.path)
        self._chat = None  # (template, stop ids), built on first use: base models have no chat format
        # Agents and RAG resend a growing transcript with one model: its start is computed once.
        self._prefix = PrefixCache(device=lm.device)

    @property
    def native_tools(self) -> bool:
        """Whether the model was made for native tool calls: tuned on them (`finetune instruct` on
        records with tools), or its own chat template takes tools."""
        template = template_from_json(self.lm.meta.get("chat_template"), self.lm.tokenizer)
        return bool(self.lm.meta.get("tool_calls")) or template.name == "jinja" and template.tool_markers() is not None

    def _run(self, ids: list[int], stop_ids: set[int], max_tokens: int, temperature: float, stop: Sequence[str],
             seed: int | None, on_text: Callable[[str], None] | None) -> str:
        ctx = self.lm.config.context_length
        if len(ids) >= ctx:
            raise LMForgeError(f"the prompt is {len(ids)} tokens; the model's context is {ctx}")
        return generate_text(self.lm.model, self.lm.tokenizer, "", prompt_ids=ids, stop_ids=stop_ids,
                             max_new_tokens=min(max_tokens, ctx - len(ids)), temperature=temperature, seed=seed,
                             stop=list(stop), stream=on_text, prefix_cache=self._prefix)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, stop: Sequence[str] = (),
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
        ids = self.lm.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise LMForgeError("the prompt is empty")
        return self._run(ids, self.lm.stop_ids(), max_tokens, temperature, stop, seed, on_text)

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: Sequence[str] = (), seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
        if self._chat is None:
            self._chat = chat_setup(self.lm)
        template, stop_ids = self._chat
        return self._run(chat_ids(self.lm, template, messages), stop_ids, max_tokens, temperature, stop, seed,
                         on_text)

    def chat_tools(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None) -> dict | None:
        if self._chat is None:
            self._chat = chat_setup(self.lm)
        if self._chat[0].tool_markers() is None:
            return None
        return reply(self.lm, messages, tools=tools, max_new_tokens=max_tokens, temperature=temperature, seed=seed)


def api_base(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the API root ending in /v1 (as OpenAI's clients
    take it). Anything but an http(s) URL is an error."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LMForgeError(f"--api {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


class RemoteGenerator:
    """An OpenAI-compatible server. `model` None asks the server for its first model; `timeout`
    bounds every wait (connecting, and each gap between streamed pieces)."""

    native_tools = False  # a server does not say what its model was tuned on: native tools on request only

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        import httpx

        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self.timeout = timeout
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        data = self._call("GET", "/models")
        try:
            return str(data["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise LMForgeError(f"{self.base}/models lists no model; name one with --api-model") from None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, self.base + path, json=body)
        except httpx.TimeoutException:
            raise LMForgeError(f"{self.base} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise LMForgeError(f"cannot reach {self.base}: {e}") from None
        _raise_for_error(r.status_code, r.content)
        try:
            return r.json()
        except ValueError:
            raise LMForgeError(f"{self.base}{path} did not answer with JSON") from None

    @staticmethod
    def _fitting(send: Callable[[dict], object], body: dict):
        """`send(body)`; a request whose max_tokens overflows the model's context is sent once more with
        the max_tokens that fit (the server's error says how many tokens the prompt took)."""
        try:
            return send(body)
        except LMForgeError as e:
            room = context_room(str(e))
            if room is None or not 1 <= room < body.get("max_tokens", 0):
                raise
            return send({**body, "max_tokens": room})

    def _generate(self, path: str, body: dict, on_text: Callable[[str], None] | None) -> str:
        return self._fitting(lambda b: self._generate_once(path, b, on_text), body)

    def _generate_once(self, path: str, body: dict, on_text: Callable[[str], None] | None) -> str:
        body = {"model": self.name, **body}
        if on_text is None:
            data = self._call("POST", path, body)
            try:
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
            except (KeyError, IndexError, TypeError):
                raise LMForgeError(f"{self.base}{path} answered without a choice") from None
            return str(text or "")[:MAX_TEXT]
        return self._stream(path, {**body, "stream": True}, on_text)

    def _stream(self, path: str, body: dict, on_text: Callable[[str], None]) -> str:
        import httpx

        parts: list[str] = []
        size = 0
        try:
            with self.http.stream("POST", self.base + path, json=body) as r:
                if r.status_code >= 400:
                    _raise_for_error(r.status_code, r.read())
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    piece = _piece(payload, self.base + path)
                    if piece:
                        piece = piece[:MAX_TEXT - size]
                        size += len(piece)
                        parts.append(piece)
                        on_text(piece)
                    if size >= MAX_TEXT:
                        break
        except httpx.TimeoutException:
            raise LMForgeError(f"{self.base} stopped answering for {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise LMForgeError(f"cannot reach {self.base}: {e}") from None
        return "".join(parts)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, stop: Sequence[str] = (),
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
        return self._generate("/completions", _body(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                                    stop=stop, seed=seed), on_text)

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: Sequence[str] = (), seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
        return self._generate("/chat/completions", _body(messages=messages, max_tokens=max_tokens,
                                                         temperature=temperature, stop=stop, seed=seed), on_text)

    def chat_tools(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None) -> dict | None:
        body = _body(model=self.name, messages=messages, tools=tools, max_tokens=max_tokens, temperature=temperature,
                     stop=(), seed=seed)
        try:
            data = self._fitting(lambda b: self._call("POST", "/chat/completions", b), body)
        except LMForgeError as e:
            if "answered 400" in str(e) and "tool" in str(e):  # this server cannot: the ReAct text loop instead
                return None
            raise
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise LMForgeError(f"{self.base}/chat/completions answered without a choice") from None
        content = message.get("content")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list) or not (content is None or isinstance(content, str)):
            raise LMForgeError(f"{self.base}/chat/completions answered a malformed message")
        return {"role": "assistant", "content": (content or "")[:MAX_TEXT] or None, "tool_calls": calls[:16]} \
            if calls else {"role": "assistant", "content": (content or "")[:MAX_TEXT]}

    def close(self) -> None:
        self.http.close()


def _body(stop: Sequence[str], seed: int | None, **fields) -> dict:
    body = dict(fields)
    if stop:
        body["stop"] = list(stop)
    if seed is not None:
        body["seed"] = seed
    return body


def _piece(payload: str, where: str) -> str:
    """The text of one streamed chunk; an error object sent mid-stream becomes an LMForgeError."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise LMForgeError(f"{where} streamed something that is not JSON") from None
    if not isinstance(chunk, dict):
        raise LMForgeError(f"{where} streamed something that is not a JSON object")
    if "error" in chunk:
        raise LMForgeError(f"{where} failed mid-answer: {_message(chunk)}")
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""  # e.g. the usage chunk
    c = choices[0]
    text = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
    return text if isinstance(text, str) else ""


def _message(data) -> str:
    err = data.get("error") if isinstance(data, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    return str(msg or data)[:300]


def context_room(message: str) -> int | None:
    """From a server's "prompt plus max_tokens is too long" error, the max_tokens that would fit: lmforge's
    wording, and OpenAI's and vLLM's ("maximum context length is C tokens ... (P in the messages, ...")."""
    m = re.search(r"prompt's (\d+) tokens plus max_tokens \d+ exceed the model's context of (\d+)", message)
    if m:
        return int(m[2]) - int(m[1])
    m = re.search(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages", message, flags=re.S)
    return int(m[1]) - int(m[2]) if m else None


def _raise_for_error(status: int, content: bytes) -> None:
    if status < 400:
        return
    try:
        data = json.loads(content)
    except ValueError:
        data = content[:300].decode(errors="replace")
    raise LMForgeError(f"the server answered {status}: {_message(data) if isinstance(data, dict) else data}")


def open_generator(model: str | None = None, api: str | None = None, api_model: str | None = None,
                   api_key: str | None = None, device: str = "auto", timeout: float = 60.0) -> Generator:
    """What `--model DIR` or `--api URL [--api-model NAME] [--api-key KEY]` on a command line name:
    exactly one of the two."""
    if (model is None) == (api is None):
        raise LMForgeError("give exactly one of --model DIR (a local model) or --api URL (an OpenAI-compatible "
                           "server)")
    if api is not None:
        return RemoteGenerator(api, api_model, api_key, timeout)
    from ..formats.load import load_model

    return LocalGenerator(load_model(model, device))
