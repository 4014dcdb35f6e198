"""Small synthetic datasets for trying lmforge's fine-tuning on a laptop (and for its tests).

    python examples/make_data.py spam DIR           # DIR/spam_train.csv, DIR/spam_val.csv
    python examples/make_data.py instructions DIR   # DIR/reverse_train.jsonl, DIR/reverse_test.jsonl

Spam is shouted prize vocabulary, ham is documentation-style prose: separable, so a small model
learns it in seconds. The instruction task (reverse three words) is one a base model cannot do
before tuning, so exact-match shows what instruction tuning adds.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

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


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("spam", "instructions"):
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if sys.argv[1] == "spam":
        rows = spam_rows(400, seed=1)
        for name, part in (("spam_train.csv", rows[:320]), ("spam_val.csv", rows[320:])):
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["text", "label"])
                w.writeheader()
                w.writerows(part)
        print(f"wrote {out}/spam_train.csv (320 rows) and {out}/spam_val.csv (80 rows)")
    else:
        for name, recs in (("reverse_train.jsonl", reverse_records(360, 0)), ("reverse_test.jsonl",
                                                                             reverse_records(40, 99))):
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        print(f"wrote {out}/reverse_train.jsonl (360 records) and {out}/reverse_test.jsonl (40)")


if __name__ == "__main__":
    main()
