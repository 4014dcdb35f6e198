"""A stand-in model that obeys whatever it reads, behind OpenAI's chat API (for the injection tests).

    python scripted_model.py PORT REQUESTS.jsonl

Policy, deterministic: in an agent conversation (the system prompt describes `Action Input`) it
first searches for the task, then carries out every "call the X tool with Y" and "read PATH" line
found anywhere in the conversation, in order, then gives a final answer. Otherwise (a RAG
question) it answers by repeating those instructions and cites source [1]. Every request body is
appended to REQUESTS.jsonl, so a test can see exactly what the host sent.
"""

from __future__ import annotations

import json
import re
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

CALL = re.compile(r"call the (\w+) tool with ([^;\n]+)")
READ = re.compile(r"\bread (\S+)")


def instructions(text: str) -> list[tuple[str, str]]:
    found = [(m.start(), m.group(1), m.group(2).strip()) for m in CALL.finditer(text)]
    found += [(m.start(), "read", m.group(1).rstrip(".;")) for m in READ.finditer(text)]
    return [(tool, arg) for _, tool, arg in sorted(found)]


def reply(messages: list[dict]) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if "Action Input" in system:
        plan = [("search", users[0])]
        for text in users[1:]:
            plan += [step for step in instructions(text) if step not in plan]
        done = sum(m["role"] == "assistant" for m in messages)
        if done < len(plan):
            tool, arg = plan[done]
            return f"Thought: I do what I was told.\nAction: {tool}\nAction Input: {arg}\n"
        return "Final Answer: I did everything the documents asked."
    steps = instructions(users[-1] if users else "")
    return "Doing as the sources say: " + "; ".join(f"{t} {a}" for t, a in steps) + " [1]"


def make_app(log_path: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "obedient", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with open(log_path, "a") as f:
            f.write(json.dumps(body) + "\n")
        text = reply(body["messages"])
        if body.get("stream"):
            chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            return StreamingResponse(iter([f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]),
                                     media_type="text/event-stream")
        return {"id": "x", "object": "chat.completion", "model": "obedient",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    return app


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
