"""Sequence-to-sequence data: input/target records, T5 span corruption, BART text infilling, the
encoder-decoder collation, BLEU/chrF/exact match, and the dates example."""

from __future__ import annotations

import json
import math
import re
from datetime import date, datetime

import numpy as np
import pytest
import sacrebleu
import torch
from make_data import write_dates  # examples/ is on the path (tests/helpers.py)

from lmforge.core.errors import LMForgeError
from lmforge.data.collate import IGNORE, collate_seq2seq
from lmforge.data.noising import (
    infilling_spans,
    random_spans_noise_mask,
    span_corrupt,
    span_corruption_lengths,
    t5_sentinels,
    text_infill,
)
from lmforge.data.records import read_pairs
from lmforge.data.synthetic import DATE_FORMATS, date_records
from lmforge.eval.seq2seq import bleu, chrf, exact_match, seq2seq_scores

# -- records


def test_read_pairs_from_jsonl_csv_and_tsv_with_chosen_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "5 March 2021", "target": "2021-03-05"}\n\n{"input": "x", "target": "y", "id": 3}\n')
    assert read_pairs(p) == (["5 March 2021", "x"], ["2021-03-05", "y"])
    c = tmp_path / "d.csv"
    c.write_text('src,tgt\n"a, b",A\nc,C\n')
    assert read_pairs(c, "src", "tgt") == (["a, b", "c"], ["A", "C"])
    t = tmp_path / "d.tsv"
    t.write_text("input\ttarget\na b\tA B\n")
    assert read_pairs(t) == (["a b"], ["A B"])


@pytest.mark.parametrize("name, text, fields, message", [
    ("d.jsonl", '{"input": "a", "answer": "b"}\n', (),
     r"d\.jsonl: no column 'target' .*--input-column / --target-column"),
    ("d.csv", "question,target\na,b\n", (), r"d\.csv: no column 'input' \(columns: question, target\)"),
    ("d.csv", "src,target\na,b\n", ("source", "target"), r"no column 'source'"),
    ("d.jsonl", '{"input": "a", "target": "b"}\n{"input": "c"}\n', (), r"d\.jsonl:2: 'target' must be .*\(missing\)"),
    ("d.jsonl", '{"input": "a", "target": 7}\n', (), r"d\.jsonl:1: 'target' must be a non-empty string$"),
    ("d.csv", "input,target\na,b\n  ,c\n", (), r"d\.csv:3: 'input' must be a non-empty string"),
    ("d.jsonl", '{"input": "a", "target": "b"}\n[1]\n', (), r"d\.jsonl:2: expected a JSON object"),
    ("d.jsonl", '{"input": "a", "target": "b"\n', (), r"d\.jsonl:1: invalid JSON"),
])
def test_read_pairs_bad_input_is_one_line_naming_file_and_field(tmp_path, name, text, fields, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(LMForgeError, match=message) as e:
        read_pairs(p, *fields)
    assert "\n" not in str(e.value)


# -- T5 span corruption


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """(value, length) of each run of equal values."""
    out: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_noise_mask_has_t5s_exact_counts_for_every_seed():
    for length in (2, 3, 7, 20, 64, 100, 513):
        noise = min(max(round(length * 0.15), 1), length - 1)
        spans = max(round(noise / 3), 1)
        for seed in range(60):
            mask = random_spans_noise_mask(length, np.random.default_rng(seed))
            assert mask.shape == (length,) and mask.sum() == noise
            r = runs(mask)
            assert [v for v, _ in r] == [False, True] * spans  # kept first, noise last, alternating
    a, b = (random_spans_noise_mask(100, np.random.default_rng(s)) for s in (5, 5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, random_spans_noise_mask(100, np.random.default_rng(6)))


def test_noise_mask_spreads_noise_over_the_sequence():
    counts = sum(random_spans_noise_mask(100, np.random.default_rng(s)).astype(int) for s in range(2000)) / 2000
    # Position 0 is always kept and the last always noise; in between every position is equally
    # likely, ~15% (a segmentation that bunched spans together would fail here).
    assert counts[0] == 0 and counts[-1] == 1
    assert 0.11 < counts[20:80].min() and counts[20:80].max() < 0.19


def merge(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The original sequence back from span corruption: each sentinel in the inputs replaced by
    what follows the same sentinel in the targets."""
    spans, current = {}, None
    for t in targets:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    return [x for t in inputs for x in (spans[t] if t in sentinels else [t])]


def test_span_corruption_reconstructs_and_uses_t5s_sentinels():
    vocab = 500
    sentinels = t5_sentinels(vocab)
    assert sentinels[:3] == [499, 498, 497] and len(sentinels) == 100
    for seed in range(200):
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab - 100, size=int(rng.integers(2, 300))).tolist()
        inputs, targets = span_corrupt(ids, np.random.default_rng(seed), sentinels)
        noise = random_spans_noise_mask(len(ids), np.random.default_rng(seed))
        spans = len(runs(noise)) // 2
        assert merge(inputs, targets, sentinels) == ids
        assert [t for t in inputs if t >= 400] == sentinels[:spans] == [t for t in targets if t >= 400]
        assert targets[0] == sentinels[0] and inputs[-1] == sentinels[spans - 1]
        assert len(targets) == noise.sum() + spans and len(inputs) == len(ids) - noise.sum() + spans
    inputs, targets = span_corrupt([5, 6, 7, 8, 9, 10, 11], np.random.default_rng(0), [99, 98], eos_id=1)
    assert inputs[-1] == targets[-1] == 1 and merge(inputs[:-1], targets[:-1], [99, 98]) == [5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(LMForgeError, match="spans to replace but only 1 sentinel"):
        span_corrupt(list(range(100)), np.random.default_rng(0), [999])


def test_span_corruption_lengths_match_t5_and_the_real_output():
    assert span_corruption_lengths(512) == (568, 114)  # T5's pretraining shapes (random_spans_helper)
    for inputs_length in (16, 64, 100, 128, 512):
        tokens, target_length = span_corruption_lengths(inputs_length)
        inputs, targets = span_corrupt(list(range(tokens)), np.random.default_rng(inputs_length),
                                       t5_sentinels(10_000), eos_id=1)
        assert (len(inputs), len(targets)) == (inputs_length, target_length)


# -- BART text infilling


def test_text_infilling_masks_30_percent_in_poisson_spans():
    lengths, masked, total = [], 0, 0
    for seed in range(400):
        n = 50 + seed % 150
        spans = infilling_spans(n, np.random.default_rng(seed))
        assert sum(k for _, k in spans) == math.ceil(0.3 * n)  # exactly the ratio, every time
        ends = [s + k for s, k in spans]
        assert all(0 <= s and e <= n for s, e in zip([s for s, _ in spans], ends))
        assert all(ends[i] <= spans[i + 1][0] for i in range(len(spans) - 1))  # in order, no overlap
        lengths += [k for _, k in spans]
        masked, total = masked + sum(k for _, k in spans), total + n
    assert abs(masked / total - 0.3) < 0.005
    lengths = np.array(lengths)  # Poisson(3), bar the one span per sample cut to fit
    assert 2.7 < lengths.mean() < 3.1 and abs((lengths == 0).mean() - math.exp(-3)) < 0.015


def test_text_infill_replaces_each_span_with_one_mask_and_keeps_the_original_as_target():
    mask = 1000
    seen_insert = False
    for seed in range(300):
        ids = np.random.default_rng(seed + 10_000).integers(0, 999, size=40 + seed % 60).tolist()
        noisy, target = text_infill(ids, np.random.default_rng(seed), mask)
        spans = infilling_spans(len(ids), np.random.default_rng(seed))
        assert target == ids
        assert noisy.count(mask) == len(spans) and len(noisy) == len(ids) - sum(k for _, k in spans) + len(spans)
        rebuilt, it = [], iter(spans)  # each mask stands for its span's tokens, in order
        for t in noisy:
            if t == mask:
                start, k = next(it)
                assert ids[start:start + k] == ids[len(rebuilt):len(rebuilt) + k]
                rebuilt += ids[start:start + k]
            else:
                rebuilt.append(t)
        assert rebuilt == ids
        seen_insert |= any(k == 0 for _, k in spans)
    assert seen_insert  # zero-length spans occur and insert a mask
    a = text_infill(list(range(100)), np.random.default_rng(3), mask)
    assert a == text_infill(list(range(100)), np.random.default_rng(3), mask)
    assert a != text_infill(list(range(100)), np.random.default_rng(4), mask)
    with pytest.raises(LMForgeError, match="lambda > 0"):
        text_infill([1, 2, 3], np.random.default_rng(0), mask, poisson_lambda=0)


# -- collation


def test_collate_seq2seq_pads_and_shifts_the_target_right():
    batch = collate_seq2seq([([5, 6, 7], [8, 9, 2]), ([5], [3, 2])], pad_id=0, decoder_start_id=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["decoder_input_ids"].tolist() == [[4, 8, 9], [4, 3, 0]]
    assert batch["labels"].tolist() == [[8, 9, 2], [3, 2, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


# -- metrics


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    refs = ["the cat sat on the mat", "dates are written in many ways", "2021-03-05", "a b c d"]
    preds = ["the cat sat on a mat", "dates are written many ways", "2021-03-05", "d c b a"]
    assert bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score
    assert chrf(preds, refs) == sacrebleu.corpus_chrf(preds, [refs]).score
    assert 0 < bleu(preds, refs) < 100 and bleu(refs, refs) == pytest.approx(100) == chrf(refs, refs)
    assert exact_match(preds, refs) == 0.25
    assert exact_match([" 2021-03-05\n", "2021-03-06", "X"], ["2021-03-05", "2021-03-06 ", "x"]) == 2 / 3
    scores = seq2seq_scores(preds, refs)
    assert scores == {"exact_match": 0.25, "bleu": bleu(preds, refs), "chrf": chrf(preds, refs), "examples": 4}
    with pytest.raises(LMForgeError, match="2 predictions for 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(LMForgeError, match="no predictions"):
        exact_match([], [])


# -- the dates example

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
# One reference pattern per way of writing a date, after ordinal suffixes are dropped: slashes are
# month first, dots day first, two-digit years the POSIX way (as strptime's %y reads them).
PATTERNS = ["%Y-%m-%d", "%d of %B %Y", "the %d of %B, %Y", "%m/%d/%y", "%m/%d/%Y", "%b %d '%y", "%B %d, %Y",
            "%B %d %Y", "%d %B %Y", "%A, %d %B %Y", "%a %b %d %Y", "%d.%m.%Y", "%d-%b-%Y", "%Y%m%d"]


def parse_date(text: str) -> date:
    """The one date `text` can mean under PATTERNS; checks ordinal suffixes and weekdays on the way."""
    for number, suffix in re.findall(r"\b(\d+)(st|nd|rd|th)\b", text):
        n = int(number)
        assert suffix == ("th" if n in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")), text
    plain = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", text)
    found = set()
    for pattern in PATTERNS:
        try:
            found.add(datetime.strptime(plain, pattern).date())
        except ValueError:
            pass
    assert len(found) == 1, (text, found)  # parses, and one way only
    d = found.pop()
    named = [i for i, w in enumerate(WEEKDAYS) if re.search(rf"\b{w[:3]}", text.lower())]
    assert named in ([], [d.weekday()]), text  # strptime ignores the weekday: check it here
    return d


def test_dates_parse_back_and_splits_hold_different_dates(tmp_path):
    write_dates(tmp_path, 3000, 400, 400, seed=7)
    splits = {s: read_pairs(tmp_path / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert [len(splits[s][0]) for s in ("train", "valid", "test")] == [3000, 400, 400]
    days = {}
    for split, (inputs, targets) in splits.items():
        for text, iso in zip(inputs, targets):
            assert date.fromisoformat(iso).isoformat() == iso and re.fullmatch(r"\d{4}-\d\d-\d\d", iso)
            assert parse_date(text) == date.fromisoformat(iso)
        days[split] = set(targets)
    assert len(days["valid"]) == 400 and len(days["test"]) == 400  # one record per held-out date
    assert days["train"].isdisjoint(days["valid"] | days["test"]) and days["valid"].isdisjoint(days["test"])
    lines = (tmp_path / "corpus.txt").read_text().splitlines()
    assert lines == [x for pair in zip(*splits["train"]) for x in pair]
    assert json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0]).keys() == {"input", "target"}


def test_dates_use_every_format_and_are_deterministic_by_seed():
    records = date_records(2000, 10, 10, seed=1)
    assert records == date_records(2000, 10, 10, seed=1) and records != date_records(2000, 10, 10, seed=2)
    d = date(2021, 3, 5)
    examples = {f(d) for f in DATE_FORMATS.values()}
    assert {"5th of March 2021", "03/05/21", "Mar 5 '21", "2021-03-05", "March 5, 2021", "5 March 2021",
            "Friday, 5 March 2021", "05.03.2021"} <= examples
    assert all(parse_date(text) == d for text in examples)
    kinds = {re.sub(r"\d", "0", r["input"]) for r in records["train"]}
    assert len(kinds) >= len(DATE_FORMATS)  # every format is drawn
    for edge in (date(1969, 1, 1), date(2068, 12, 31), date(2000, 2, 29), date(2011, 11, 11), date(2022, 12, 22)):
        assert all(parse_date(f(edge)) == edge for f in DATE_FORMATS.values())
    with pytest.raises(LMForgeError, match="must leave dates for train"):
        date_records(10, 30_000, 10_000)
