"""Teach a small model to use the calculator tool, then measure what the tool adds.

    python examples/react_calculator.py data DIR              # DIR/calc_train.jsonl (chat records)
    lmforge finetune instruct BASE --data DIR/calc_train.jsonl --out runs/calc-agent --pack --lr 3e-3 --max-minutes 6
    python examples/react_calculator.py eval runs/calc-agent   # accuracy with and without the tool (JSON)

The records are ReAct transcripts exactly as `lmforge agent` writes them (the same system prompt,
the same fenced observations): a multi-digit sum or product, a calculator call, the observation,
the final answer. Half the records ask for the answer directly ("answer with the number only"),
so the same model can be asked without its tool: small models get such arithmetic wrong by
themselves. Held-out questions use another seed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from lmforge.agents.react import observation_message, system_prompt
from lmforge.agents.tools import calculate, make_tools
from lmforge.rag.fence import new_marker

QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
             "Calculate {a} {op} {b} for me.", "{a} {op} {b} = ?"]
DIRECT = " Answer with the number only."


def question(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["+", "-", "*"])
    digits = (3, 2) if op == "*" else (rng.randint(3, 5), rng.randint(3, 5))
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in digits)
    return rng.choice(QUESTIONS).format(a=a, op=op, b=b), f"{a} {op} {b}"


def tool_record(rng: random.Random) -> dict:
    q, expr = question(rng)
    tools = make_tools("calculator")
    marker = new_marker(rng)
    result = calculate(expr)
    return {"messages": [
        {"role": "system", "content": system_prompt(tools)}, {"role": "user", "content": q},
        {"role": "assistant",
         "content": f"Thought: I will use the calculator.\nAction: calculator\nAction Input: {expr}"},
        observation_message(result, marker),
        {"role": "assistant", "content": f"Thought: I have the result.\nFinal Answer: {result}"}]}


def direct_record(rng: random.Random) -> dict:
    q, expr = question(rng)
    return {"messages": [{"role": "user", "content": q + DIRECT}, {"role": "assistant", "content": calculate(expr)}]}


def write_data(out: Path, n: int = 3000, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = [tool_record(rng) if i % 2 == 0 else direct_record(rng) for i in range(n)]
    with open(out / "calc_train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {n} records to {out / 'calc_train.jsonl'}")


def evaluate(model_dir: str, n: int = 40, seed: int = 12345) -> dict:
    """Held-out questions: the agent's final answers (with the calculator) and the same model's
    direct answers (no tool), each compared with the true value."""
    from lmforge.agents.react import run_agent
    from lmforge.core.errors import LMForgeError
    from lmforge.formats.load import load_model
    from lmforge.inference.client import LocalGenerator

    gen = LocalGenerator(load_model(model_dir, "cpu"))
    tools = make_tools("calculator")
    rng = random.Random(seed)
    with_tool = without = 0
    examples = []
    for i in range(n):
        q, expr = question(rng)
        truth = calculate(expr)
        try:
            answer = run_agent(gen, q, tools, max_steps=3, max_tokens=32, seed=i).answer
        except LMForgeError:  # the transcript outgrew the context: no answer
            answer = None
        bare = gen.chat([{"role": "user", "content": q + DIRECT}], max_tokens=16).strip()
        with_tool += (answer or "").strip() == truth
        without += bare == truth
        if len(examples) < 5:
            examples.append({"question": q, "truth": truth, "agent": answer, "bare": bare})
    return {"questions": n, "agent_accuracy": with_tool / n, "bare_accuracy": without / n,
            "margin": (with_tool - without) / n, "examples": examples}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("data", "eval"):
        sys.exit(__doc__)
    if sys.argv[1] == "data":
        write_data(Path(sys.argv[2]))
    else:
        print(json.dumps(evaluate(sys.argv[2]), indent=2))
