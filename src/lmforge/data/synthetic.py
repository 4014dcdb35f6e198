"""Small synthetic datasets, generated deterministically: documentation-style sentences, SMS-style
spam/ham rows and a reverse-the-words instruction task. `examples/make_data.py` writes them to
files for the README's walkthrough; the built-in evaluation tasks and the tests use them directly.

Spam is shouted prize vocabulary, ham is documentation-style prose: separable, so a small model
learns it in seconds.
"""

from __future__ import annotations

import random

NOUNS = ["function", "module", "value", "list", "string", "object", "file", "class", "method", "argument",
         "result", "iterator", "dictionary", "number", "error", "thread", "socket", "buffer", "path", "key"]
VERBS = ["returns", "accepts", "raises", "creates", "reads", "writes", "holds", "checks", "yields", "sorts"]
ADJS = ["new", "empty", "optional", "default", "given", "current", "first", "last", "small", "valid"]
SPAM_WORDS = ["win", "free", "prize", "cash", "click", "offer", "winner", "claim", "urgent", "bonus", "money", "deal"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} a {rng.choice(ADJS)} "
            f"{rng.choice(NOUNS)}." for _ in range(n)]


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    sents = make_sentences(n_docs * 6, seed)
    return [" ".join(sents[i * 6:(i + 1) * 6]) for i in range(n_docs)]


def spam_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    spam = [" ".join(rng.choice(SPAM_WORDS) for _ in range(rng.randint(4, 8))).capitalize() + "!"
            for _ in range(n // 2)]
    ham = make_sentences(n - n // 2, seed=seed + 100)
    rows = [{"text": t, "label": "spam"} for t in spam] + [{"text": t, "label": "ham"} for t in ham]
    rng.shuffle(rows)
    return rows


def reverse_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(NOUNS) for _ in range(3)]
        out.append({"instruction": "Reverse the words: " + " ".join(words), "output": " ".join(reversed(words))})
    return out
