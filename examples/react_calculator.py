"""Teach a small model to use the calculator tool, then measure what the tool adds.

    python examples/react_calculator.py data DIR       # DIR/calc_pretrain.jsonl (text), DIR/calc_train.jsonl (chats)
    lmforge pretrain --data DIR/calc_pretrain.jsonl --vocab-size 512 --arch llama --n-layer 4 --n-embd 128 \\
        --n-head 4 --context-length 512 --max-steps 1263 --eval-every 200 --out runs/calc-base
    lmforge finetune instruct runs/calc-base --data DIR/calc_train.jsonl --out runs/calc-agent --pack \\
        --max-steps 360 --eval-every 1000 --samples 0
    python examples/react_calculator.py eval runs/calc-agent   # accuracy with and without the tool (JSON)

What matters is steps, not minutes (a CPU shared with other work gives a time budget a fraction
of the steps): the base learns to copy numbers between steps ~700 and ~1,000 of 4,096 tokens, so
the budgets are in steps: a base of 1,263 and a fine-tune of 360, at the default learning rates.

The chat records are ReAct transcripts exactly as `lmforge agent` runs them (the same system
prompt, the same fenced observations): a multi-digit sum, difference or product, one short
calculator step (`Action: calculator` / `Action Input: 4821 * 37`), the observation, then
`Final Answer: N`. Half the records ask for the answer directly ("answer with the number only"),
so the same model can be asked without its tool; small models get such arithmetic wrong by
themselves. The pretraining text is the same transcripts as plain text (the system prompt in
one of four), so a base trained from scratch learns to copy numbers (induction) before it
learns the chat format. A tokenizer with 512 tokens keeps digits nearly all single (its merges go
to the prompt's words; a few pairs such as 12 merge), and a number splits the same way wherever
it appears, so it is copied token by token.

The held-out questions come from another seed, and no training record repeats one of them.
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
EVAL_SEED, EVAL_N = 12345, 200  # held-out questions (evaluation takes the first n)


def question(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["+", "-", "*"])
    digits = (rng.randint(3, 4), 2) if op == "*" else (rng.randint(3, 5), rng.randint(3, 5))
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in digits)
    return rng.choice(QUESTIONS).format(a=a, op=op, b=b), f"{a} {op} {b}"


def held_out(n: int = EVAL_N) -> list[tuple[str, str]]:
    rng = random.Random(EVAL_SEED)
    return [question(rng) for _ in range(n)]


def training_questions(rng: random.Random):
    """A `fresh()` that draws questions whose expression is never a held-out one."""
    banned = {expr for _, expr in held_out()}

    def fresh() -> tuple[str, str]:
        while True:
            q, expr = question(rng)
            if expr not in banned:
                return q, expr

    return fresh


def tool_messages(q: str, expr: str, rng: random.Random) -> list[dict]:
    result = calculate(expr)
    return [{"role": "system", "content": system_prompt(make_tools("calculator"))}, {"role": "user", "content": q},
            {"role": "assistant", "content": f"Action: calculator\nAction Input: {expr}"},
            observation_message(result, new_marker(rng)),
            {"role": "assistant", "content": f"Final Answer: {result}"}]


def direct_messages(q: str, expr: str) -> list[dict]:
    return [{"role": "user", "content": q + DIRECT}, {"role": "assistant", "content": calculate(expr)}]


def plain_text(messages: list[dict], with_system: bool) -> str:
    """A transcript as pretraining text: the turns' contents, one after another."""
    return "\n".join(m["content"] for m in messages if with_system or m["role"] != "system")


def write_data(out: Path, n_chat: int = 4000, n_text: int = 20000, seed: int = 0) -> None:
    rng = random.Random(seed)
    fresh = training_questions(rng)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calc_train.jsonl", "w") as f:
        for i in range(n_chat):
            q, expr = fresh()
            messages = tool_messages(q, expr, rng) if i % 2 == 0 else direct_messages(q, expr)
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(out / "calc_pretrain.jsonl", "w") as f:
        for i in range(n_text):
            q, expr = fresh()
            messages = tool_messages(q, expr, rng) if i % 3 else direct_messages(q, expr)
            f.write(json.dumps({"text": plain_text(messages, with_system=i % 4 == 0)}) + "\n")
    print(f"wrote {n_chat} chat records to {out / 'calc_train.jsonl'} and {n_text} texts to "
          f"{out / 'calc_pretrain.jsonl'}")


def evaluate(model_dir: str, n: int = EVAL_N) -> dict:
    """Held-out questions through the agent loop (`lmforge agent`'s run_agent, with the calculator)
    and the same model answering directly (no tool), each compared with the true value. Also how
    often the agent's calculator input was exactly the question's expression."""
    from lmforge.agents.react import run_agent
    from lmforge.core.errors import LMForgeError
    from lmforge.formats.load import load_model
    from lmforge.inference.client import LocalGenerator

    gen = LocalGenerator(load_model(model_dir, "cpu"))
    tools = make_tools("calculator")
    with_tool = without = copied = 0
    examples = []
    for i, (q, expr) in enumerate(held_out(n)):
        truth = calculate(expr)
        try:
            result = run_agent(gen, q, tools, max_steps=3, max_tokens=32, seed=i)
            answer, calls = result.answer, [e["input"] for e in result.transcript if e["event"] == "tool"]
        except LMForgeError:  # the transcript outgrew the context: no answer
            answer, calls = None, []
        bare = gen.chat([{"role": "user", "content": q + DIRECT}], max_tokens=16).strip()
        with_tool += (answer or "").strip() == truth
        without += bare == truth
        copied += calls[:1] == [expr]
        if len(examples) < 5:
            examples.append({"question": q, "truth": truth, "calculator_input": calls[:1], "agent": answer,
                             "bare": bare})
    return {"questions": n, "agent_accuracy": with_tool / n, "bare_accuracy": without / n,
            "margin": (with_tool - without) / n, "calculator_input_exact": copied / n, "examples": examples}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("data", "eval"):
        sys.exit(__doc__)
    if sys.argv[1] == "data":
        write_data(Path(sys.argv[2]))
    else:
        print(json.dumps(evaluate(sys.argv[2]), indent=2))
