"""Real agent frameworks run a model lmforge taught to call tools (`make test-tool-agents`, not `make test`:
it trains `examples/tool_calling.py`'s model first, ~10-15 minutes on 2 cores).

The OpenAI Agents SDK (Chat Completions and Responses models) and LangChain's agent each answer
held-out questions (never in training) through the calculator, against a real `lmforge serve`.
Set LMFORGE_TOOL_MODEL to an existing `OUT_DIR/model` to skip the training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve import Server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from react_calculator import held_out  # noqa: E402
from tool_calling import TOOL  # noqa: E402

from lmforge.agents.tools import calculate  # noqa: E402

pytestmark = pytest.mark.tool_agents
QUESTIONS = held_out()[:10]
NEED = 9  # of 10: the example scores ~99% on its 200 held-out questions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    given = os.environ.get("LMFORGE_TOOL_MODEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("tool_example")
    subprocess.run([sys.executable, str(EXAMPLES / "tool_calling.py"), str(out)], check=True, timeout=1800)
    return out / "model"


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--name", "calc")
    yield s
    s.close()


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_agents_sdk_agent_answers_through_the_calculator(server, api):
    from agents import Agent, FunctionTool, ModelSettings, RunConfig, Runner
    from helpers import agents_model

    ran: list[str] = []

    async def run_calculator(ctx, arguments: str) -> str:
        expression = json.loads(arguments)["expression"]
        ran.append(expression)
        return calculate(expression)

    fn = TOOL["function"]
    tool = FunctionTool(name=fn["name"], description=fn["description"], params_json_schema=fn["parameters"],
                        on_invoke_tool=run_calculator, strict_json_schema=True)
    model = agents_model(server.url, "calc", api)
    agent = Agent(name="calc", model=model, tools=[tool], model_settings=ModelSettings(temperature=0))
    right = 0
    for q, expr in QUESTIONS:
        result = Runner.run_sync(agent, q, max_turns=4, run_config=RunConfig(tracing_disabled=True))
        right += str(result.final_output).strip() == calculate(expr)
    assert right >= NEED, (right, ran)
    assert sum(e == expr for e, (_, expr) in zip(ran, QUESTIONS)) >= NEED  # it called with the question's numbers


def test_a_langchain_agent_answers_through_the_calculator(server):
    from langchain.agents import create_agent
    from langchain_core.tools import StructuredTool
    from langchain_openai import ChatOpenAI

    fn = TOOL["function"]
    tool = StructuredTool.from_function(func=lambda expression: calculate(expression), name=fn["name"],
                                        description=fn["description"], args_schema=fn["parameters"])
    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="calc", temperature=0, max_retries=0)
    agent = create_agent(llm, tools=[tool])
    right = 0
    for q, expr in QUESTIONS:
        state = agent.invoke({"messages": [{"role": "user", "content": q}]}, {"recursion_limit": 8})
        calls = [c for m in state["messages"] for c in getattr(m, "tool_calls", None) or []]
        right += state["messages"][-1].content.strip() == calculate(expr) and calls[0]["args"]["expression"] == expr
    assert right >= NEED, right


def test_lmforge_agent_calls_the_tool_natively(model_dir):
    from lmforge.agents.react import run_agent
    from lmforge.agents.tools import make_tools
    from lmforge.formats.load import load_model
    from lmforge.inference.client import LocalGenerator

    generator = LocalGenerator(load_model(model_dir, "cpu"))
    assert generator.native_tools  # tuned on tool calls: auto picks native calls
    results = [run_agent(generator, q, make_tools("calculator"), max_steps=3) for q, _ in QUESTIONS]
    inputs = [[e["input"] for e in r.transcript if e["event"] == "tool"] for r in results]
    assert sum(r.answer == calculate(expr) for r, (_, expr) in zip(results, QUESTIONS)) >= NEED, inputs
    assert sum(i == [expr] for i, (_, expr) in zip(inputs, QUESTIONS)) >= NEED
    q, expr = QUESTIONS[1]  # and from the command line
    log = model_dir.parent / "agent.jsonl"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "agent", "--model", str(model_dir), "--tools", "calculator",
                           "--device", "cpu", "--log", str(log), q], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    assert [e["event"] for e in map(json.loads, log.read_text().splitlines())][:4] == ["task", "model", "tool", "model"]
