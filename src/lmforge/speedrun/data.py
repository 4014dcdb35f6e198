"""The speedrun's data, built from the corpus at run time: a pretraining/validation split, chat
conversations about the functions and modules it documents, held-out questions, and preference
pairs on a rule the report can measure.

The rule: an answer opens by saying where it comes from ("From the docs: Serialize obj ...").
Only a quarter of the chat data does so, so instruction tuning alone follows it now and then; the
preference pairs differ only in that opening, so DPO can learn it, and `follows_rule` checks it.
(A first rule, opening with the function's dotted name, asked a 3-layer model to copy a name of
up to 40 characters from the question: after DPO it opened with a module name, never the right one.)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.fileio import atomic_write

SYSTEM = "You are a small assistant trained on Python's documentation. Answer briefly."
PREFIX = "From the docs: "
RULE = f'the answer opens by citing the documentation ("{PREFIX.strip()} ...")'
RULE_SHARE = 0.25  # of the chat answers that follow the rule
MAX_ANSWER_CHARS = 240
_FUNC = re.compile(r"^([A-Za-z_][\w.]*)\(")
_MODULE = re.compile(r"^Module ([\w.]+)$")
QUESTIONS = ["What does {name} do?", "Explain {name}.", "What is {name} for?", "Tell me about {name}."]
MODULE_QUESTIONS = ["What is the {name} module?", "What does the {name} module provide?"]
SMALL_TALK = [  # identity and small talk: a chat model should know what it is and greet back
    ("Who are you?", "I am a small language model trained with lmforge on Python's own documentation."),
    ("What can you do?", "I can answer short questions about Python's standard library."),
    ("Hello!", "Hello! Ask me about a Python function or module."),
    ("Hi, how are you?", "I am fine, thank you. What would you like to know about Python?"),
    ("Thank you!", "You are welcome."),
    ("Who made you?", "I was trained from scratch by lmforge's speedrun, on text that ships with Python."),
    ("Goodbye.", "Goodbye!"),
    ("What is your name?", "I am the lmforge speedrun model."),
]


@dataclass
class Fact:
    """One documented name and the answer its docstring gives."""

    name: str
    answer: str
    module: bool = False


def first_paragraph(body: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """The docstring's first paragraph on one line, cut at a sentence end (else a word) within `limit`."""
    text = " ".join(body.strip().split("\n\n")[0].split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[:end + 1] if end > limit // 3 else cut[:cut.rfind(" ")] + " ..."


def facts(documents: list[str]) -> list[Fact]:
    """Functions and modules with a docstring paragraph long enough to answer from, in corpus order."""
    found: dict[str, Fact] = {}
    for doc in documents:
        name, body = title_name(doc), doc.partition("\n\n")[2]
        answer = first_paragraph(body) if name else ""
        if name and len(answer) >= 40 and name not in found:
            found[name] = Fact(name, answer, module=doc.startswith("Module "))
    return list(found.values())


def title_name(doc: str) -> str | None:
    """The function or module a pydocs document is about (None for other text)."""
    title = doc.partition("\n\n")[0]
    func, module = _FUNC.match(title), _MODULE.match(title)
    return func.group(1) if func and "." in func.group(1) else module.group(1) if module else None


def held_out(name: str, share: float) -> bool:
    """Whether a name's questions are kept out of training: a hash, so the split never moves."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16 ** 8 < share


def follows_rule(answer: str) -> bool:
    return answer.lstrip().startswith(PREFIX.strip())


def without_rule(answer: str) -> str:
    """The answer's content: what word F1 compares with the docstring (the rule's words are not in it)."""
    return answer.lstrip().removeprefix(PREFIX.strip()).strip()


def with_rule(fact: Fact) -> str:
    return PREFIX + fact.answer


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def question(fact: Fact, rng: random.Random) -> str:
    return rng.choice(MODULE_QUESTIONS if fact.module else QUESTIONS).format(name=fact.name)


def chat_data(all_facts: list[Fact], n_sft: int, n_pairs: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    """{sft, prefs, eval}: chat records (plus small talk), preference pairs on functions the chat data
    did not use, and held-out questions ({question, name, reference}) no training record names."""
    rng = random.Random(seed)
    evaluation = [f for f in all_facts if held_out(f.name, 0.1) and not f.module]
    train = [f for f in all_facts if not held_out(f.name, 0.1)]
    rng.shuffle(train)
    funcs = [f for f in train if not f.module]
    pref_facts, sft_facts = funcs[:n_pairs], [f for f in train if f not in funcs[:n_pairs]][:n_sft]
    sft = [conversation(question(f, rng), with_rule(f) if rng.random() < RULE_SHARE else f.answer) for f in sft_facts]
    for _ in range(max(1, n_sft // 100)):  # small talk at about 8% of the chat data
        sft += [conversation(q, a) for q, a in SMALL_TALK]
    rng.shuffle(sft)
    prefs = [{"messages": conversation(question(f, rng), "")["messages"][:2], "chosen": with_rule(f),
              "rejected": f.answer} for f in pref_facts]
    held = [{"question": question(f, rng), "name": f.name, "reference": f.answer} for f in evaluation[:n_eval]]
    return {"sft": sft, "prefs": prefs, "eval": held}


def split_corpus(documents: list[str], val_share: float = 0.02) -> tuple[list[str], list[str]]:
    """(train, validation) documents for pretraining and bits per byte: every document whose hash
    falls under `val_share`, so the split is the same on every run."""
    train, val = [], []
    for doc in documents:
        (val if held_out(doc, val_share) else train).append(doc)
    return train, val


def word_f1(answer: str, reference: str) -> float:
    """Token-level F1 of lower-cased words (SQuAD's answer overlap), the held-out answers' score."""
    a, r = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
    if not a or not r:
        return 0.0
    common = sum(min(a.count(w), r.count(w)) for w in set(a))
    if not common:
        return 0.0
    p, q = common / len(a), common / len(r)
    return 2 * p * q / (p + q)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
