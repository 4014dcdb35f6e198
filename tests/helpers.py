"""Helpers shared by the tests: synthetic text and CLI runners."""

from __future__ import annotations

import os
import random
import subprocess
import sys

NOUNS = ["function", "module", "value", "list", "string", "object", "file", "class", "method", "argument",
         "result", "iterator", "dictionary", "number", "error", "thread", "socket", "buffer", "path", "key"]
VERBS = ["returns", "accepts", "raises", "creates", "reads", "writes", "holds", "checks", "yields", "sorts"]
ADJS = ["new", "empty", "optional", "default", "given", "current", "first", "last", "small", "valid"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                   f"a {rng.choice(ADJS)} {rng.choice(NOUNS)}.")
    return out


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    sents = make_sentences(n_docs * 6, seed)
    return [" ".join(sents[i * 6:(i + 1) * 6]) for i in range(n_docs)]


def run_cli(*args: str, timeout: int = 300, input: str | None = None, env: dict | None = None):
    """`lmforge ARGS...` in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env=full_env)


def assert_clean_error(proc, fragment: str) -> None:
    """Exit code 2, one line on stderr mentioning `fragment`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert fragment.lower() in errors[0].lower(), errors[0]


SPAM_WORDS = ["win", "free", "prize", "cash", "click", "offer", "winner", "claim", "urgent", "bonus", "money", "deal"]


def spam_rows(n: int, seed: int = 0) -> list[dict]:
    """A separable spam/ham task: spam is shouted prize vocabulary, ham is documentation prose."""
    rng = random.Random(seed)
    spam = [" ".join(rng.choice(SPAM_WORDS) for _ in range(rng.randint(4, 8))).capitalize() + "!"
            for _ in range(n // 2)]
    ham = make_sentences(n - n // 2, seed=seed + 100)
    rows = [{"text": t, "label": "spam"} for t in spam] + [{"text": t, "label": "ham"} for t in ham]
    rng.shuffle(rows)
    return rows


def reverse_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-style records for a task a base model cannot do: reverse three words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(NOUNS) for _ in range(3)]
        out.append({"instruction": "Reverse the words: " + " ".join(words), "output": " ".join(reversed(words))})
    return out
