"""The agent loop. With a model that calls tools natively (its chat template takes tools, or a
server that accepts OpenAI `tools`), each step is a chat completion with the tools offered: the host
runs the calls it makes and sends back `tool` messages, until it answers without a call. Otherwise,
the ReAct loop in text: Thought -> Action -> Action Input -> (host runs the tool) -> Observation,
until the model writes `Final Answer:`.

Each model step is an assistant turn, generation stopped at "Observation:"; the host parses the
action, runs it only if it names a tool on the allow-list, and sends the result back fenced as data
(a new random marker each time). Tool errors and refusals are observations too, so the model can
recover, and every step is recorded in the transcript.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.errors import LMForgeError
from ..inference.client import Generator
from ..rag.fence import FENCE_RULE, fence, new_marker
from .tools import MAX_INPUT, Tool, ToolError

ACTION = re.compile(r"^\s*Action\s*:\s*(.*?)\s*$", re.M)
ACTION_INPUT = re.compile(r"^\s*Action\s+Input\s*:\s*(.*)", re.M | re.S)
FINAL = re.compile(r"^\s*Final\s+Answer\s*:\s*(.*)", re.M | re.S)


def system_prompt(tools: dict[str, Tool]) -> str:
    listing = "\n".join(f"- {t.name}: {t.description}" for t in tools.values())
    return (f"Tools (only these exist):\n{listing}\n\nFormat:\nThought: what to do next\nAction: a tool name\n"
            "Action Input: its input\n(then stop: the result comes back as an Observation)\n"
            "Final Answer: the answer, once you know it\n\n" + FENCE_RULE)


def observation_message(observation: str, marker: str) -> dict:
    """The user turn that carries a tool's result back to the model, fenced as data."""
    return {"role": "user", "content": "Observation:\n" + fence(observation, marker, "OBSERVATION")}


def parse_step(text: str) -> tuple[str, str | None, str | None]:
    """("final", answer, None), ("action", tool, input), or ("invalid", None, None)."""
    action = ACTION.search(text)
    final = FINAL.search(text)
    if final and (not action or final.start() < action.start()):
        return "final", final.group(1).strip(), None
    if action:
        given = ACTION_INPUT.search(text, action.end())
        value = given.group(1).split("\nObservation", 1)[0].strip() if given else ""
        return "action", action.group(1).strip(), value
    return "invalid", None, None


@dataclass
class AgentResult:
    answer: str | None
    steps: int
    transcript: list[dict] = field(default_factory=list)


def run_agent(generator: Generator, task: str, tools: dict[str, Tool], max_steps: int = 8, max_tokens: int = 256,
              temperature: float = 0.0, seed: int | None = None,
              confirm: Callable[[str, str], bool] | None = None,
              on_event: Callable[[dict], None] | None = None, tool_format: str = "auto") -> AgentResult:
    """Run the loop. `confirm(tool, input)` is asked before each call (the human in the loop);
    `on_event` sees each transcript entry as it happens. `tool_format`: native (OpenAI tool calls),
    react (the text loop), or auto: native when the generator says its model was tuned for it."""
    if max_steps < 1:
        raise LMForgeError("--max-steps must be at least 1")
    if not task.strip():
        raise LMForgeError("the task is empty")
    transcript: list[dict] = []

    def record(entry: dict) -> None:
        transcript.append(entry)
        if on_event:
            on_event(entry)

    record({"event": "task", "text": task, "tools": sorted(tools)})
    if tool_format == "native" or tool_format == "auto" and getattr(generator, "native_tools", False):
        native = _run_native(generator, task, tools, max_steps, max_tokens, temperature, seed, confirm, record)
        if native is None:
            raise LMForgeError(f"{generator.name} cannot call tools natively; use --tool-format react")
        return AgentResult(native[0], native[1], transcript)
    rng = random.Random(seed) if seed is not None else None  # --seed: the same markers, so runs repeat
    messages = [{"role": "system", "content": system_prompt(tools)}, {"role": "user", "content": task}]
    for step in range(1, max_steps + 1):
        text = generator.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                              stop=["Observation:"])
        record({"event": "model", "step": step, "text": text})
        kind, name, value = parse_step(text)
        if kind == "final":
            record({"event": "final", "step": step, "answer": name})
            return AgentResult(name, step, transcript)
        observation = _act(kind, name, value, tools, confirm, record, step)
        marker = new_marker(rng)  # each observation gets a marker of its own
        messages += [{"role": "assistant", "content": text.rstrip()}, observation_message(observation, marker)]
    record({"event": "stopped", "step": max_steps, "reason": f"no Final Answer after {max_steps} steps"})
    return AgentResult(None, max_steps, transcript)


def _run_native(generator: Generator, task: str, tools: dict[str, Tool], max_steps: int, max_tokens: int,
                temperature: float, seed: int | None, confirm: Callable[[str, str], bool] | None,
                record: Callable[[dict], None]) -> tuple[str | None, int] | None:
    """The loop with native tool calls: (answer, steps), or None if the model cannot call tools.
    Tool results go back as `tool` messages, which templates fence with tokens text cannot forge."""
    specs = [t.spec() for t in tools.values()]
    messages: list[dict] = [{"role": "user", "content": task}]
    for step in range(1, max_steps + 1):
        message = generator.chat_tools(messages, specs, max_tokens=max_tokens, temperature=temperature, seed=seed)
        if message is None:
            return None
        calls = message.get("tool_calls") or []
        shown = "\n".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
        record({"event": "model", "step": step, "text": (message.get("content") or "") + shown})
        if not calls:
            answer = (message.get("content") or "").strip()
            record({"event": "final", "step": step, "answer": answer})
            return answer, step
        messages.append(message)
        for call in calls:
            name, value = _call_input(call, tools)
            if name in tools and value is None:
                observation = f'error: call {name} with {{"{tools[name].param}": "..."}}'
                record({"event": "invalid", "step": step, "observation": observation})
            else:  # an unknown tool is refused there
                observation = _act("action", name, value or "", tools, confirm, record, step)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": observation})
    record({"event": "stopped", "step": max_steps, "reason": f"no answer after {max_steps} steps"})
    return None, max_steps


def _call_input(call: dict, tools: dict[str, Tool]) -> tuple[str, str | None]:
    """A native call's tool name and its one string argument (None if the arguments lack it)."""
    fn = call.get("function") or {}
    name = str(fn.get("name", ""))[:200]
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except (TypeError, ValueError):
        return name, None
    value = args.get(tools[name].param) if name in tools and isinstance(args, dict) else None
    return name, value if isinstance(value, str) else None


def _act(kind: str, name: str | None, value: str | None, tools: dict[str, Tool],
         confirm: Callable[[str, str], bool] | None, record: Callable[[dict], None], step: int) -> str:
    """Run one action (if allowed) and return its observation."""
    if kind == "invalid":
        observation = "error: write `Action:` and `Action Input:` lines, or `Final Answer:`"
        record({"event": "invalid", "step": step, "observation": observation})
        return observation
    assert name is not None and value is not None
    if name not in tools:
        observation = f"refused: there is no tool {name[:60]!r}; the only tools are {', '.join(sorted(tools))}"
        record({"event": "refused", "step": step, "tool": name[:200], "input": value[:MAX_INPUT],
                "observation": observation})
        return observation
    if len(value) > MAX_INPUT:
        observation = f"error: the input is longer than {MAX_INPUT} characters"
    elif confirm is not None and not confirm(name, value):
        observation = "the user declined this call"
    else:
        try:
            observation = tools[name].run(value)
        except ToolError as e:
            observation = f"error: {e}"
    record({"event": "tool", "step": step, "tool": name, "input": value[:MAX_INPUT], "observation": observation})
    return observation
