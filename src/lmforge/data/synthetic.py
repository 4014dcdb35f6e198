"""Small synthetic datasets, generated deterministically: documentation-style sentences, SMS-style
spam/ham rows, a reverse-the-words instruction task and dates to normalise (sequence to sequence).
`examples/make_data.py` writes them to files for the README's walkthrough; the built-in evaluation
tasks and the tests use them directly.

Spam is shouted prize vocabulary, ham is documentation-style prose: separable, so a small model
learns it in seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import date, timedelta

from ..core.errors import LMForgeError

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


# Dates as people write them, each mapped to ISO 8601: a sequence-to-sequence task small enough to
# learn on a laptop, with a right answer that can be checked. Slashes are always US order
# (month/day/year) and dots always day-first, so no input is ambiguous. Two-digit years read the
# POSIX way (69-99: 19xx, 00-68: 20xx), so the dates span 1969 to 2068.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DATE, LAST_DATE = date(1969, 1, 1), date(2068, 12, 31)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


DATE_FORMATS: dict[str, Callable[[date], str]] = {
    "iso": lambda d: d.isoformat(),                                                      # 2021-03-05
    "day_of_month": lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",     # 5th of March 2021
    "the_day_of_month": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "us_short": lambda d: f"{d.month:02}/{d.day:02}/{d.year % 100:02}",                  # 03/05/21
    "us_long": lambda d: f"{d.month}/{d.day}/{d.year}",                                  # 3/5/2021
    "abbr_apostrophe": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} '{d.year % 100:02}",  # Mar 5 '21
    "month_day_year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",              # March 5, 2021
    "month_ordinal_year": lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",  # March 5th, 2021
    "lower_month_day_year": lambda d: f"{MONTHS[d.month - 1].lower()} {d.day} {d.year}",  # march 5 2021
    "day_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",               # 5 March 2021
    "weekday_day_month_year": lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    "weekday_abbr": lambda d: f"{WEEKDAYS[d.weekday()][:3]} {MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    "dotted": lambda d: f"{d.day:02}.{d.month:02}.{d.year}",                             # 05.03.2021
    "day_abbr_year": lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",            # 5-Mar-2021
    "compact": lambda d: f"{d.year}{d.month:02}{d.day:02}",                              # 20210305
}


def date_records(n_train: int, n_valid: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "valid", "test"}: lists of {"input": a date in one of `DATE_FORMATS`, "target": ISO}.
    The splits hold different dates (valid and test one record per date; train cycles through its
    own dates, in a new format each time round), so a score on test is a score on unseen dates."""
    rng = random.Random(seed)
    days = [FIRST_DATE + timedelta(days=i) for i in range((LAST_DATE - FIRST_DATE).days + 1)]
    if min(n_train, n_valid, n_test) < 0:
        raise LMForgeError(f"split sizes must not be negative (got {n_train}, {n_valid}, {n_test})")
    if n_valid + n_test >= len(days):
        raise LMForgeError(f"valid + test take one date each and must leave dates for train: at most "
                           f"{len(days) - 1} of the {len(days)} days from {FIRST_DATE} to {LAST_DATE}")
    rng.shuffle(days)
    pools = {"test": days[:n_test], "valid": days[n_test:n_test + n_valid], "train": days[n_test + n_valid:]}
    formats = list(DATE_FORMATS)
    out = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        picks = [pools[split][i % len(pools[split])] for i in range(n)]
        out[split] = [{"input": DATE_FORMATS[rng.choice(formats)](d), "target": d.isoformat()} for d in picks]
    return out
