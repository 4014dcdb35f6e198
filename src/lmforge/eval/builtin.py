"""Built-in evaluation tasks, generated deterministically (no download, no vendored benchmark data).

- `arithmetic` (generation, exact match): "Question: What is 48 + 17?\\nAnswer:" -> "65";
- `pydocs` (multiple choice): a standard-library docstring (the name masked) and four function
  names; which one it documents. A model pretrained on pydocs has read these docstrings, so this
  measures what it retained, not generalisation;
- `spam` (multiple choice): an SMS-style message (the synthetic data of `examples/make_data.py`)
  and the choices ham / spam.

Each has its own few-shot pool, drawn apart from the scored documents.
"""

from __future__ import annotations

import random
import re

from ..core.errors import LMForgeError
from ..data.synthetic import spam_rows

DOCS = 200  # scored documents per task (pools are the same size)
_FUNC = re.compile(r"^([A-Za-z_][\w.]*)\(")


def builtin_fields(name: str) -> dict:
    """The fields of built-in task `name` (tasks.py makes the `Task`, so this module needs nothing of it)."""
    if name == "arithmetic":
        return dict(name="arithmetic", kind="generate", docs=arithmetic_docs(DOCS, seed=1),
                    pool=arithmetic_docs(DOCS, seed=2), max_tokens=8)
    if name == "spam":
        return dict(name="spam", kind="choice", docs=spam_docs(DOCS, seed=7), pool=spam_docs(DOCS, seed=8))
    if name == "pydocs":
        from ..text.corpus import pydocs

        docs = pydocs_docs(pydocs(), 2 * DOCS)
        return dict(name="pydocs", kind="choice", docs=docs[:DOCS], pool=docs[DOCS:])
    raise LMForgeError(f"unknown built-in task {name!r}")


def arithmetic_docs(n: int, seed: int) -> list[dict]:
    """Two-digit sums and differences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        answer = a + b if op == "+" else a - b
        docs.append({"prompt": f"Question: What is {a} {op} {b}?\nAnswer:", "target": str(answer)})
    return docs


def spam_docs(n: int, seed: int) -> list[dict]:
    return [{"context": f"Message: {r['text']}\nIs this message spam or ham?\nAnswer:", "choices": ["ham", "spam"],
             "answer": int(r["label"] == "spam")} for r in spam_rows(n, seed)]


def pydocs_docs(documents: list[str], n: int, seed: int = 0) -> list[dict]:
    """Up to n "which function does this docstring describe?" questions from pydocs documents (a
    title line `module.function(signature)`, a blank line, the docstring)."""
    found: dict[str, str] = {}
    for doc in documents:
        title, _, body = doc.partition("\n\n")
        m = _FUNC.match(title)
        if not m or "." not in m.group(1):
            continue
        name = m.group(1)
        short = name.rsplit(".", 1)[-1]
        first = body.strip().split("\n\n")[0].replace("\n", " ")
        first = re.sub(rf"\b{re.escape(short)}\b", "___", first)[:300]  # the docstring must not name it
        if len(first) >= 40 and name not in found:
            found[name] = first
    names = sorted(found)
    if len(names) < 4:
        raise LMForgeError("the pydocs corpus holds too few documented functions for the pydocs task")
    rng = random.Random(seed)
    picked = rng.sample(names, min(n, len(names)))
    docs = []
    for name in picked:
        choices = rng.sample([x for x in names if x != name], 3) + [name]
        rng.shuffle(choices)
        docs.append({"context": f"Docstring: {found[name]}\nQuestion: Which function does this docstring "
                                f"describe?\nAnswer:", "choices": choices, "answer": choices.index(name)})
    return docs
