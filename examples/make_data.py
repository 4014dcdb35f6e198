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
import sys
from pathlib import Path

# The generators live in the package (the built-in evaluation tasks use them); re-exported for the tests.
from lmforge.data.synthetic import (  # noqa: F401
    ADJS,
    NOUNS,
    VERBS,
    make_docs,
    make_sentences,
    reverse_records,
    spam_rows,
)


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
