"""The request bodies of the server's OpenAPI document (GET /openapi.json), as JSON Schemas.

The routes read their bodies themselves (a size limit first, then validation field by field in
protocol.py and responses.py, with OpenAI-shaped 400s), so FastAPI cannot derive these: they are
written here to match what those validators accept, field for field (tests/test_serve_fuzz.py
checks the field lists and fuzzes every operation from this document). Rules that tie one field
to another (`top_logprobs` needs `logprobs`, a tool result needs an earlier call's id, the prompt
plus `max_tokens` must fit the context) are said in descriptions, not encoded. JSON Schema's
"integer" also matches 1.0, which the server refuses where it wants an integer (as it always has).
"""

from __future__ import annotations

from typing import Any

from ..text.toolcalls import MAX_ARGUMENTS, MAX_TOOLS, ROLES
from .protocol import (
    IGNORED,
    MAX_EMBED_INPUTS,
    MAX_FEEDBACK_TEXT,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOPS,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
)
from .responses import FIELDS as RESPONSE_FIELDS
from .responses import ROLES as RESPONSE_ROLES
from .responses import TEXT_PARTS

Schema = dict[str, Any]
NULL: Schema = {"type": "null"}
STRING: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}  # OpenAI's rule for function names


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, NULL]}


def integer(lo: int, hi: int) -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def number(lo: float, hi: float) -> Schema:
    return {"type": "number", "minimum": lo, "maximum": hi}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = True, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out


TEXT_PART = obj({"type": {"enum": list(TEXT_PARTS)}, "text": STRING}, ("type", "text"), closed=False)
TOOL_CALL = obj({"id": nullable({"type": "string", "maxLength": 128}), "type": STRING,
                 "function": obj({"name": NAME, "arguments": {"anyOf": [
                     {"type": "string", "maxLength": MAX_ARGUMENTS, "description": "a JSON object, as text"}, OBJECT]}},
                                 ("name",), closed=False)},
                ("function",), closed=False)
CONTENT = {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}]}
MESSAGE = {"anyOf": [  # text.toolcalls.normalize_messages
    obj({"role": {"enum": [r for r in ROLES if r not in ("assistant", "tool")]}, "content": CONTENT},
        ("role", "content"), closed=False),
    obj({"role": {"const": "assistant"}, "content": nullable(CONTENT), "reasoning_content": nullable(STRING),
         "tool_calls": nullable({"type": "array", "maxItems": MAX_TOOLS, "items": TOOL_CALL})}, ("role",),
        closed=False, anyOf=[{"properties": {"content": CONTENT}, "required": ["content"]},
                             {"properties": {"tool_calls": {"type": "array", "minItems": 1}},
                              "required": ["tool_calls"]},
                             {"properties": {"reasoning_content": STRING}, "required": ["reasoning_content"]}]),
    obj({"role": {"const": "tool"}, "content": CONTENT, "tool_call_id": STRING}, ("role", "content", "tool_call_id"),
        closed=False, description="tool_call_id names a call of an earlier assistant message")]}
FUNCTION = obj({"name": NAME, "description": nullable(STRING),
                "parameters": nullable(obj({"type": {"const": "object"}}, closed=False)),
                "strict": nullable(BOOL)}, ("name",))
TOOLS = nullable({"type": "array", "maxItems": MAX_TOOLS,
                  "items": obj({"type": {"const": "function"}, "function": FUNCTION}, ("type", "function"),
                               closed=False)})
TOOL_CHOICE = nullable({"anyOf": [{"enum": ["none", "auto", "required"]},
                                  obj({"type": {"const": "function"}, "function": obj({"name": STRING}, ("name",),
                                                                                      closed=False)},
                                      ("type", "function"), closed=False)]})
RESPONSE_FORMAT = nullable({"anyOf": [
    obj({"type": {"enum": ["text", "json_object"]}}, ("type",), closed=False),
    obj({"type": {"const": "json_schema"},
         "json_schema": obj({"name": STRING, "description": STRING, "schema": OBJECT, "strict": nullable(BOOL)},
                            closed=False)}, ("type", "json_schema"), closed=False)]})
STOP = nullable({"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "minLength": 1}}]})
LOGIT_BIAS = nullable({"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]+$"},
                       "additionalProperties": number(-100, 100),
                       "description": "token id (a string of digits, below the vocabulary size): bias"})
IGNORED_VALUES: dict[str | None, Schema] = {None: {}, "null": NULL, "text": nullable({"const": ["text"]})}


def common(model: str) -> dict[str, Schema]:
    """The sampling fields /v1/completions and /v1/chat/completions share (protocol.parse_sampling)."""
    return {
        "model": {"enum": [model, None], "description": "this server's one model (or left out)"},
        "max_tokens": nullable(integer(1, MAX_TOKENS)),
        "temperature": nullable(number(0, 2)),
        "top_p": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": nullable(integer(1, MAX_TOKENS)),
        "seed": nullable(integer(-(1 << 63), (1 << 63) - 1)),
        "stop": STOP,
        "n": nullable(integer(1, MAX_N)),
        "stream": nullable(BOOL),
        "stream_options": nullable(obj({"include_usage": nullable(BOOL)}, description="needs stream: true")),
        "presence_penalty": nullable(number(-2, 2)),
        "frequency_penalty": nullable(number(-2, 2)),
        "repetition_penalty": nullable(number(1e-3, 10)),
        "logit_bias": LOGIT_BIAS,
        "response_format": RESPONSE_FORMAT,
        **{name: IGNORED_VALUES[only] for name, only in IGNORED.items()},
    }


def completion_body(model: str) -> Schema:
    one = {"type": "string", "minLength": 1}
    return obj({**common(model),
                "prompt": {"anyOf": [one, {"type": "array", "minItems": 1, "maxItems": 1, "items": one}]},
                "logprobs": nullable(integer(0, MAX_TOP_LOGPROBS)),
                "echo": {"enum": [False, None], "description": "echo is not supported"}},
               ("prompt",), description="the prompt's tokens plus max_tokens must fit the model's context")


def chat_body(model: str) -> Schema:
    return obj({**common(model),
                "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
                "max_completion_tokens": nullable(integer(1, MAX_TOKENS)),
                "logprobs": nullable(BOOL),
                "top_logprobs": nullable({**integer(0, MAX_TOP_LOGPROBS), "description": "needs logprobs: true"}),
                "tools": TOOLS, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": nullable(BOOL)},
               ("messages",), description="the prompt's tokens plus max_tokens must fit the model's context")


def responses_body(model: str) -> Schema:
    """POST /v1/responses (responses.to_chat): stateless, text and function tools only."""
    parts = {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}]}
    item = {"anyOf": [
        obj({"type": {"const": "message"}, "role": {"enum": list(RESPONSE_ROLES)}, "content": parts},
            ("role", "content"), closed=False),
        obj({"type": {"const": "function_call"}, "call_id": STRING, "name": NAME, "arguments": STRING},
            ("type", "call_id", "name", "arguments"), closed=False),
        obj({"type": {"const": "function_call_output"}, "call_id": STRING, "output": parts},
            ("type", "call_id", "output"), closed=False),
        obj({"type": {"const": "reasoning"}}, ("type",), closed=False)]}
    tool = obj({"type": {"const": "function"}, "name": NAME, "description": nullable(STRING),
                "parameters": nullable(obj({"type": {"const": "object"}}, closed=False)), "strict": nullable(BOOL)},
               ("type", "name"), closed=False)
    fmt = {"anyOf": [obj({"type": {"enum": ["text", "json_object"]}}, ("type",), closed=False),
                     obj({"type": {"const": "json_schema"}, "name": STRING, "schema": OBJECT,
                          "description": nullable(STRING), "strict": nullable(BOOL)},
                         ("type", "name", "schema"), closed=False)]}
    properties: dict[str, Schema] = {
        "model": {"enum": [model, None]},
        "input": {"anyOf": [STRING, {"type": "array", "items": item}],
                  "description": "a string, or items: at least one message unless instructions are given"},
        "instructions": nullable(STRING),
        "tools": nullable({"type": "array", "maxItems": MAX_TOOLS, "items": tool}),
        "tool_choice": nullable({"anyOf": [{"enum": ["none", "auto", "required"]},
                                           obj({"type": {"const": "function"}, "name": STRING}, ("type", "name"),
                                               closed=False)]}),
        "parallel_tool_calls": nullable(BOOL),
        "text": nullable(obj({"format": nullable(fmt), "verbosity": {"enum": ["low", "medium", "high", None]}})),
        "max_output_tokens": nullable(integer(1, MAX_TOKENS)),
        "temperature": nullable(number(0, 2)),
        "top_p": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "stream": nullable(BOOL),
        "metadata": nullable({"type": "object", "additionalProperties": STRING}),
        "store": {"enum": [False, None], "description": "lmforge keeps no responses"},
        "background": {"enum": [False, None]},
        "truncation": {"enum": ["disabled", None]},
        "top_logprobs": {"enum": [0, None]},
        "previous_response_id": {"enum": ["", None], "description": "lmforge keeps no responses"},
        "conversation": {"enum": ["", None], "description": "lmforge keeps no responses"},
    }
    # the rest are accepted and ignored, with the type responses.FIELDS gives them
    types = {str: STRING, list: {"type": "array"}, dict: OBJECT, bool: BOOL, int: {"type": "integer"}}
    for key in RESPONSE_FIELDS.keys() - properties.keys():
        properties[key] = nullable(types[RESPONSE_FIELDS[key]])
    return obj(properties, ("input",))


def embeddings_body(model: str) -> Schema:
    one = {"type": "string", "minLength": 1}
    return obj({"model": {"enum": [model, None]},
                "input": {"anyOf": [one, {"type": "array", "minItems": 1, "maxItems": MAX_EMBED_INPUTS,
                                          "items": one}]},
                "encoding_format": {"const": "float"}, "user": {}}, ("input",),
               description="only a server holding an encoder embeds")


def tokenize_body(model: str) -> Schema:
    """The text in prompt, or (when prompt is left out) in text."""
    return obj({"model": {"enum": [model, None]}, "prompt": STRING, "text": {}},
               anyOf=[{"required": ["prompt"]}, {"properties": {"text": STRING}, "required": ["text"]}])


def feedback_body() -> Schema:
    text = {"type": "string", "maxLength": MAX_FEEDBACK_TEXT}
    return obj({"model": {}, "prompt": {}, "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
                "chosen": text, "rejected": text, "tie": nullable(BOOL)}, ("chosen", "rejected"),
               anyOf=[{"required": ["messages"]},
                      {"properties": {"prompt": {"type": "string", "minLength": 1}}, "required": ["prompt"]}],
               description="the conversation in messages, or (when messages is left out) a prompt; only a server "
                           "started with --feedback records votes")


def inspect_body(model: str, vocab: int, context: int, n_layer: int, n_head: int) -> Schema:
    """POST /inspect (serve/inspect.py): one of tokens, text and messages, then what to return."""
    ids = {"type": "array", "maxItems": context, "items": integer(0, vocab - 1)}
    return obj({"model": {"enum": [model, None]},
                "tokens": {**ids, "description": "token ids, as the model reads them"},
                "text": {**STRING, "description": "tokenized as /v1/completions tokenizes a prompt"},
                "messages": {"type": "array", "minItems": 1, "items": MESSAGE,
                             "description": "a chat, in the model's chat template up to where the answer begins"},
                "continuation": nullable({**ids, "description": "token ids after the others (a completion's "
                                                               "logprobs token_id values)"}),
                "layer": nullable({**integer(0, n_layer - 1), "description": "default: the last"}),
                "head": nullable({**integer(0, n_head - 1), "description": "default (null): the mean over heads"}),
                "start": nullable({**integer(-context, context - 1),
                                   "description": "the first query position whose row is returned (negative: from "
                                                  "the end); default 0"})},
               oneOf=[{"required": ["tokens"]}, {"required": ["text"]}, {"required": ["messages"]}],
               description="the whole sequence (continuation included) must be non-empty and fit the model's "
                           "context; only a server started with --inspect answers")


ERROR = obj({"error": obj({"message": STRING, "type": STRING, "param": nullable(STRING), "code": nullable(STRING)},
                          ("message", "type", "param", "code"))}, ("error",))
# Every route may answer these (a bad field, a wrong key, a full queue ...), always in OpenAI's shape.
ERRORS = {status: {"description": what, "content": {"application/json": {"schema": ERROR}}}
          for status, what in (("4XX", "the request is refused (OpenAI's error shape)"),
                               ("5XX", "the server failed, or is busy (503, with Retry-After)"))}


def body(schema: Schema) -> dict:
    """`openapi_extra` for a route that reads this JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

