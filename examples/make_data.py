"""Small synthetic datasets for trying lmforge's fine-tuning on a laptop (and for its tests).

    python examples/make_data.py spam DIR           # DIR/spam_train.csv, DIR/spam_val.csv
    python examples/make_data.py instructions DIR   # DIR/reverse_train.jsonl, DIR/reverse_test.jsonl
    python examples/make_data.py dates DIR          # DIR/{train,valid,test}.jsonl, DIR/corpus.txt
        [--train 20000] [--valid 1000] [--test 1000] [--seed 0]

Spam is shouted prize vocabulary, ham is documentation-style prose: separable, so a small model
learns it in seconds. The instruction task (reverse three words) is one a base model cannot do
before tuning, so exact-match shows what instruction tuning adds. Dates ("5th of March 2021",
"03/05/21", "Fri Mar 5 2021", ...) map to ISO ("2021-03-05") for sequence-to-sequence models:
{"input", "target"} records, no date in two splits, and corpus.txt (every train input and target,
one a line) to train a tokenizer on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from lmforge.core.errors import LMForgeError
from lmforge.core.fileio import atomic_write

# The generators live in the package (the built-in evaluation tasks use them); re-exported for the tests.
from lmforge.data.synthetic import (  # noqa: F401
    ADJS,
    DATE_FORMATS,
    NOUNS,
    VERBS,
    date_records,
    make_docs,
    make_sentences,
    reverse_records,
    spam_rows,
)


def write_dates(out: Path, n_train: int, n_valid: int, n_test: int, seed: int) -> None:
    splits = date_records(n_train, n_valid, n_test, seed)
    for split, records in splits.items():
        atomic_write(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(out / "corpus.txt", "".join(f"{r['input']}\n{r['target']}\n" for r in splits["train"]))
    print(f"wrote {out}/train.jsonl ({n_train} records), valid.jsonl ({n_valid}), test.jsonl ({n_test}) "
          f"and corpus.txt: dates in {len(DATE_FORMATS)} formats -> ISO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["spam", "instructions", "dates"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--train", type=int, default=20000, help="dates: train records")
    parser.add_argument("--valid", type=int, default=1000, help="dates: validation records (one per date)")
    parser.add_argument("--test", type=int, default=1000, help="dates: test records (one per date)")
    parser.add_argument("--seed", type=int, default=0, help="dates: the seed that fixes dates, formats and splits")
    args = parser.parse_args()
    out = args.dir
    out.mkdir(parents=True, exist_ok=True)
    if args.kind == "dates":
        try:
            write_dates(out, args.train, args.valid, args.test, args.seed)
        except LMForgeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    elif args.kind == "spam":
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
