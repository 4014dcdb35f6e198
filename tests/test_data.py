"""Token data preparation and the deterministic batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_docs

from lmforge.core.errors import LMForgeError
from lmforge.data.tokens import BatchStream, eval_batches, prepare, split_documents
from lmforge.text.corpus import Corpus
from lmforge.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(60), 350, show_progress=False)


def test_prepare_encodes_with_separators_and_caches(tok, tmp_path, capsys):
    corpus = Corpus(make_docs(80, seed=1))
    data = prepare(corpus, tok, val_fraction=0.1, cache_dir=tmp_path)
    assert data.train.dtype == np.uint16 and len(data.val) > 0
    n_docs = int((np.asarray(data.train) == tok.eot_id).sum() + (np.asarray(data.val) == tok.eot_id).sum())
    assert n_docs == 80  # every document ends with end-of-text
    first = capsys.readouterr().err
    assert "cache hit" not in first
    again = prepare(corpus, tok, val_fraction=0.1, cache_dir=tmp_path)
    assert "cache hit" in capsys.readouterr().err
    assert np.array_equal(again.train, data.train) and again.directory == data.directory
    other = prepare(Corpus(make_docs(80, seed=2)), tok, val_fraction=0.1, cache_dir=tmp_path)
    assert other.directory != data.directory  # different text, different cache entry


def test_document_split_is_stable_and_falls_back_for_few_docs(tok, tmp_path):
    docs = make_docs(200)
    train, val = split_documents(docs, 0.1)
    assert set(train).isdisjoint(val) and 5 < len(val) < 40
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # chosen by content
    few = prepare(Corpus(["one short document " * 50]), tok, val_fraction=0.2, cache_dir=tmp_path)
    assert len(few.val) > 0 and len(few.train) > 3 * len(few.val)


def test_batch_stream_covers_each_epoch_and_is_deterministic():
    data = np.arange(1001, dtype=np.uint16)
    s = BatchStream(data, context_length=10, seed=3)
    assert s.per_epoch == 100
    x, y = s.batch(0, 100)
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = sorted(int(r[0]) for r in x)
    assert len(set(starts)) == 100 and all((b - a) == 10 for a, b in zip(starts, starts[1:]))  # one pass
    x2, _ = BatchStream(data, 10, seed=3).batch(37, 5)
    assert torch.equal(x2, x[37:42])  # any slice can be recomputed on its own (resume, DDP)
    x3, _ = s.batch(100, 100)
    assert not torch.equal(x3, x)  # a new epoch is a new order


def test_batch_stream_needs_one_window():
    with pytest.raises(LMForgeError, match="fewer than one window"):
        BatchStream(np.arange(5, dtype=np.uint16), context_length=8, seed=0)


def test_eval_batches_predict_every_token_once():
    data = np.arange(95, dtype=np.uint16)
    targets = torch.cat([b.y.flatten() for b in eval_batches(data, 10, batch_size=4)])
    assert targets.tolist() == list(range(1, 95))


def test_eval_batches_share_the_same_windows_between_ranks():
    """Ranks take disjoint shares of one list of windows; each runs as many batches (FSDP's forward
    passes are collective), a rank short of one padding with an uncounted repeat."""
    data = np.arange(95, dtype=np.uint16)  # 9 full windows of 10 (3 batches of 4, 4, 1) and a short one: 4 batches
    alone = [(b.starts, b.x.tolist()) for b in eval_batches(data, 10, batch_size=4)]
    ranks = [list(eval_batches(data, 10, batch_size=4, rank=r, world=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]
    counted = [(b.starts, b.x.tolist()) for r in ranks for b in r if b.counted]
    assert sorted(counted) == sorted(alone) and len(counted) == 4
    assert [b.counted for r in ranks for b in r] == [True, True, True, False, True, False]
    assert [len(list(eval_batches(data, 10, 4, max_windows=3, rank=r, world=2))) for r in (0, 1)] == [1, 1]


def test_a_jsonl_record_may_hold_a_raw_line_separator(tmp_path):
    from lmforge.data.records import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"input": "a\u2028b", "target": "c\u0085d"}\r\n{"input": "e", "target": "f"}\n', encoding="utf-8")
    assert read_pairs(path) == (["a\u2028b", "e"], ["c\u0085d", "f"])
