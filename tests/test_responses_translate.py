"""/v1/responses as a translation over chat completions: requests in, responses and stream events out (no server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from lmforge.serve.protocol import APIError
from lmforge.serve.responses import stream_events, to_chat, to_response

EVENT = TypeAdapter(ResponseStreamEvent)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}
TOOL = {"type": "function", "name": "weather", "description": "The weather in a city", "parameters": SCHEMA,
        "strict": True}


def chat_answer(content: str | None, calls: tuple = (), finish: str = "stop") -> dict:
    """A whole chat completion as lmforge's chat side answers it."""
    tool_calls = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                  for cid, name, args in calls]
    message = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"id": "chatcmpl-abc123", "object": "chat.completion", "created": 1700000000, "model": "tiny",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def chunks_of(chat: dict, piece: int = 3) -> list[dict]:
    """The same answer as stream chunks: text and arguments cut into `piece`-character deltas, usage last."""
    head = {"id": chat["id"], "object": "chat.completion.chunk", "created": chat["created"], "model": chat["model"]}
    message, finish = chat["choices"][0]["message"], chat["choices"][0]["finish_reason"]
    deltas: list[dict] = [{"role": "assistant"}]
    text = message["content"] or ""
    deltas += [{"content": text[i:i + piece]} for i in range(0, len(text), piece)]
    for n, call in enumerate(message.get("tool_calls") or []):
        args = call["function"]["arguments"]
        deltas.append({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": n, "function": {"arguments": args[i:i + piece]}}]}
                   for i in range(0, len(args), piece)]
    chunks = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks[-1]["choices"][0]["finish_reason"] = finish
    return chunks + [{**head, "choices": [], "usage": chat["usage"]}]


async def _aiter(items):
    for item in items:
        yield item


def stream(chunks: list[dict], request: dict) -> list[dict]:
    """The events stream_events sends, each checked to be one of OpenAI's and in sequence."""
    async def collect():
        return [sse async for sse in stream_events(_aiter(chunks), request)]

    events = []
    for sse in asyncio.run(collect()):
        kind, data = sse.split("\n", 1)
        assert kind.startswith("event: ") and data.startswith("data: ") and sse.endswith("\n\n")
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == kind.removeprefix("event: ")
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ---- requests in ----

def test_string_input_and_instructions():
    chat = to_chat({"model": "tiny", "input": "Hi", "instructions": "Be brief."})
    assert chat == {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]}


def test_item_list_input():
    chat = to_chat({"input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}',
         "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Lyon"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "19C"}]},
        {"type": "function_call", "call_id": "call_3", "name": "weather", "arguments": "{}"},
    ]})
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "weather", "arguments": a}}
             for i, a in ((1, '{"city":"Paris"}'), (2, '{"city":"Lyon"}'), (3, "{}"))]
    assert chat["messages"] == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls[:2]},  # the same turn: one message
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "19C"},
        {"role": "assistant", "content": None, "tool_calls": calls[2:]},
    ]


def test_tools_choice_format_and_sampling():
    fmt = {"type": "json_schema", "name": "final_output", "schema": SCHEMA, "strict": True}
    chat = to_chat({"model": "tiny", "input": "x", "tools": [TOOL],
                    "tool_choice": {"type": "function", "name": "weather"}, "parallel_tool_calls": False,
                    "text": {"format": fmt}, "max_output_tokens": 50, "temperature": 0.5, "top_p": 0.9, "stream": True})
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "The weather in a city", "parameters": SCHEMA, "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "final_output", "schema": SCHEMA, "strict": True}}
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"]) == (50, 0.5, 0.9)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    for choice in ("auto", "none", "required"):
        assert to_chat({"input": "x", "tools": [TOOL], "tool_choice": choice})["tool_choice"] == choice
    assert to_chat({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in to_chat({"input": "x", "text": {"format": {"type": "text"}, "verbosity": "low"}})


def test_ignored_fields_are_accepted():
    chat = to_chat({"input": "x", "metadata": {"k": "v"}, "user": "u", "service_tier": "auto", "truncation": "disabled",
                    "include": [], "reasoning": {"effort": "low"}, "prompt_cache_key": "k", "safety_identifier": "s",
                    "store": False, "background": False, "stream_options": {"include_obfuscation": False},
                    "top_logprobs": 0, "previous_response_id": None, "conversation": None})
    assert chat == {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("extra, param, fragment", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}]},
     "input[0].content[0].type", "input_image"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file"}]}]},
     "input[0].output[0].type", "input_file"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "item_reference"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments", "string"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "tools[0].parameters", "object"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice", "other"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "object"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "json_schema"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
    ({"store": True}, "store", "keeps no responses"),
    ({"background": True}, "background", "background"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"seed": 1}, "seed", "unsupported field 'seed'"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported field"),
    ({"max_output_tokens": 0}, "max_output_tokens", "at least 1"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"metadata": {"k": 1}}, "metadata", "strings"),
    ({"input": 5}, "input", "string"),
    ({"input": []}, "input", "at least one"),
])
def test_bad_requests_name_the_field(extra, param, fragment):
    with pytest.raises(APIError) as caught:
        to_chat({"model": "tiny", "input": "x", **extra})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert fragment in caught.value.message


def test_missing_input_and_non_object_body():
    for body in ({"model": "tiny"}, [], "x"):
        with pytest.raises(APIError):
            to_chat(body)


# ---- responses out ----

REQUEST = {"model": "tiny", "input": "Weather in Paris and Lyon?", "instructions": "Be brief.", "tools": [TOOL],
           "max_output_tokens": 64, "metadata": {"k": "v"}}
TWO_CALLS = (("call_a", "weather", '{"city": "Paris"}'), ("call_b", "weather", '{"city": "Lyon"}'))


def test_to_response_text():
    r = to_response(chat_answer("It is sunny."), REQUEST)
    parsed = Response.model_validate(r)
    assert parsed.output_text == "It is sunny." and parsed.status == "completed" and r["id"] == "resp_abc123"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (11, 7, 18)
    assert parsed.instructions == "Be brief." and parsed.tools[0].name == "weather" and parsed.max_output_tokens == 64


def test_to_response_tool_calls():
    parsed = Response.model_validate(to_response(chat_answer("Looking.", TWO_CALLS, "tool_calls"), REQUEST))
    assert [o.type for o in parsed.output] == ["message", "function_call", "function_call"]
    assert [(o.call_id, o.name, o.arguments, o.status) for o in parsed.output[1:]] == [
        (cid, name, args, "completed") for cid, name, args in TWO_CALLS]
    assert parsed.output_text == "Looking." and len({o.id for o in parsed.output}) == 3
    parsed = Response.model_validate(to_response(chat_answer(None, TWO_CALLS[:1], "tool_calls"), REQUEST))
    assert [o.type for o in parsed.output] == ["function_call"] and parsed.output[0].id.startswith("fc_")


def test_to_response_length_is_incomplete():
    parsed = Response.model_validate(to_response(chat_answer("It is su", finish="length"), REQUEST))
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"
    assert parsed.output_text == "It is su" and parsed.output[0].status == "incomplete"


def test_stream_text():
    chat = chat_answer("It is sunny in Paris today.")
    events = stream(chunks_of(chat), REQUEST)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "It is sunny in Paris today."
    assert events[-1]["response"] == to_response(chat, REQUEST)


def test_stream_text_and_two_tool_calls():
    chat = chat_answer("Looking.", TWO_CALLS, "tool_calls")
    events = stream(chunks_of(chat, piece=4), REQUEST)
    assert [e["type"] for e in events if e["type"].startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"] * 3
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[0]["content"] == [] and [a["arguments"] for a in added[1:]] == ["", ""]
    for n, (_, _, args) in enumerate(TWO_CALLS, start=1):
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["output_index"] == n]
        assert len(deltas) > 1 and "".join(deltas) == args
        assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"
                and e["output_index"] == n] == [args]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"] == to_response(chat, REQUEST)


def test_stream_length_empty_and_errors():
    chat = chat_answer("It is su", finish="length")
    events = stream(chunks_of(chat), REQUEST)
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"] == to_response(chat, REQUEST)
    chat = chat_answer("")  # an empty answer is still one (empty) message, streamed or not
    assert stream(chunks_of(chat), REQUEST)[-1]["response"] == to_response(chat, REQUEST)
    error = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": None}}
    assert [e["type"] for e in stream([error], REQUEST)] == ["error"]
    events = stream(chunks_of(chat_answer("Hello"))[:2] + [error], REQUEST)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["message"] == "engine died"


# ---- the OpenAI Agents SDK's default model, end to end over the translation ----

def run_agent(streamed: bool) -> tuple[object, list[dict]]:
    """An agent with a function tool and an output_type, on OpenAIResponsesModel; a scripted chat side answers."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
    from openai import AsyncOpenAI
    from pydantic import BaseModel

    class Report(BaseModel):
        city: str
        temperature_c: int

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"{city}: 21C"

    script = [chat_answer(None, (("call_1", "weather", '{"city": "Paris"}'),), "tool_calls"),
              chat_answer('{"city": "Paris", "temperature_c": 21}')]
    seen: list[dict] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        chat = to_chat(body)
        answer = script[len(seen) - 1]
        if not chat.get("stream"):
            return httpx.Response(200, json=to_response(answer, body))
        sse = "".join([e async for e in stream_events(_aiter(chunks_of(answer)), body)])
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    client = AsyncOpenAI(api_key="x", base_url="http://lmforge.test/v1", max_retries=0,
                         http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    settings = ModelSettings(temperature=0.2, top_p=0.9, max_tokens=100, parallel_tool_calls=True, store=False,
                             truncation="disabled", metadata={"run": "1"}, verbosity="low", top_logprobs=0,
                             reasoning={"effort": "low"}, prompt_cache_retention="24h") if streamed else ModelSettings()
    agent = Agent(name="weather", instructions="Answer with a report.", tools=[weather], output_type=Report,
                  model=OpenAIResponsesModel(model="tiny", openai_client=client), model_settings=settings)
    config = RunConfig(tracing_disabled=True)

    async def go():
        if not streamed:
            return await Runner.run(agent, "Weather in Paris?", run_config=config)
        result = Runner.run_streamed(agent, "Weather in Paris?", run_config=config)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(go())
    return result.final_output, seen


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_function_tool_and_output_type(streamed):
    report, seen = run_agent(streamed)
    assert (report.city, report.temperature_c) == ("Paris", 21)
    first, second = seen
    # what OpenAIResponsesModel sends by default: `include` always, text.format for the output_type, no store
    assert set(first) - {"stream"} == {"model", "input", "instructions", "tools", "include", "text"} or streamed
    assert first["text"]["format"]["name"] == "final_output" and first["tools"][0]["name"] == "weather"
    assert ("stream" in first) == streamed
    if streamed:  # and with ModelSettings set, each arrives under its Responses name
        assert first["include"] == ["message.output_text.logprobs"] and first["text"]["verbosity"] == "low"
        assert {k: to_chat(first)[k] for k in ("temperature", "top_p", "max_tokens", "parallel_tool_calls")} == {
            "temperature": 0.2, "top_p": 0.9, "max_tokens": 100, "parallel_tool_calls": True}
    else:
        assert first["include"] == []
    chat = to_chat(second)
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": "Paris: 21C"}
    assert chat["response_format"]["json_schema"]["name"] == "final_output"
