"""The OpenAI request shapes lmforge honours, validated field by field.

Everything in a request body is untrusted: each field is checked for type and range, unknown
fields are refused with a 400 that names them (never silently ignored), and errors take OpenAI's
shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..core.errors import LMForgeError
from ..text.toolcalls import closed, normalize_messages

MAX_STOPS = 4  # as OpenAI
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_TOKENS = 1 << 20  # the largest max_tokens and top_k taken
MAX_EMBED_INPUTS = 256  # texts in one /v1/embeddings request
MAX_FEEDBACK_TEXT = 100_000  # characters of a chosen or rejected answer (the chat page's votes)

# Fields that cannot change the output: accepted and ignored (`IGNORED` says which values qualify).
IGNORED = {"user": None, "metadata": None, "store": None, "service_tier": None, "prediction": "null",
           "reasoning_effort": None, "modalities": "text", "prompt_cache_key": None, "safety_identifier": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format"} | set(IGNORED)
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls"}
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class Sampling:
    """What one request asks of the engine (per choice), after validation."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False  # return each token's log-probability
    top_logprobs: int = 0  # and this many candidates per token
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not lo <= value <= hi:
        raise bad(name, f"'{name}' must be between {lo:g} and {hi:g}, not {value}")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be true or false")
    return value


def check_fields(body: object, allowed: set[str]) -> dict:
    """The body as a dict with only fields lmforge honours (a 400 naming the first other one)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported field '{unknown[0]}'", param=unknown[0], code="unsupported_parameter")
    for name, only in IGNORED.items():  # ignored only where ignoring cannot change the answer
        value = body.get(name)
        if only == "null" and value is not None or only == "text" and value not in (None, ["text"]):
            raise APIError(400, f"unsupported value of '{name}' (lmforge supports {only} only)", param=name,
                           code="unsupported_parameter")
    return body


def parse_response_format(body: dict) -> dict | None:
    """The JSON schema the output must match (json_object: any object), or None for free text.
    A json_schema's objects are closed unless they say otherwise (`closed`)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema" or not isinstance(fmt.get("json_schema"), dict):
        raise bad("response_format", "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}")
    spec = fmt["json_schema"]
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False) or False, bool):
        raise bad("response_format", "json_schema.name must be a string and json_schema.strict true or false")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise bad("response_format", "json_schema.schema must be a JSON object")
    return closed(schema)


def parse_logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in -100..100}."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"'logit_bias' must map up to {MAX_LOGIT_BIAS} token ids to numbers")
    out = {}
    for k, v in bias.items():
        try:  # decimal digits (any script, as int() reads them); '²' is a digit, yet int() fails on it
            token = int(k) if k.isdecimal() else -1
        except ValueError:  # over Python's 4,300-digit limit
            token = -1
        if token < 0 or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", f"'logit_bias' maps token ids to numbers in -100..100 (got {k!r}: {v!r})")
        out[token] = float(v)
    return out


def parse_sampling(body: dict, chat: bool) -> Sampling:
    """The shared sampling fields of /v1/completions and /v1/chat/completions."""
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, MAX_TOKENS, None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise bad("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them")
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
        if top is not None and not logprobs:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        candidates = (top or 0) if logprobs else 0
        wants_logprobs = logprobs
    else:
        top = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
        candidates, wants_logprobs = top or 0, top is not None
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", "'stream_options' may only hold 'include_usage'")
    stream = _bool(body, "stream")
    if options and not stream:
        raise bad("stream_options", "'stream_options' needs 'stream': true")
    s = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 0, 1, None),
        top_k=_number(body, "top_k", 1, MAX_TOKENS, None, integer=True),
        seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True),
        stop=stop,
        n=_number(body, "n", 1, MAX_N, 1, integer=True),
        presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1e-3, 10, 1.0),
        logprobs=wants_logprobs,
        top_logprobs=candidates,
        stream=stream,
        include_usage=bool(options and _bool(options, "include_usage")),
    )
    if s.top_p == 0:
        raise bad("top_p", "'top_p' must be greater than 0")
    return s


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        raise bad("prompt", "one prompt per request: send a string (or a list holding one)")
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "'prompt' must be a non-empty string")
    return prompt


def parse_messages(body: dict) -> list[dict]:
    """The chat messages (OpenAI's shape: developer, tool calls and tool results included), validated."""
    try:
        return normalize_messages(body.get("messages"))
    except LMForgeError as e:
        raise bad("messages", str(e)) from None
