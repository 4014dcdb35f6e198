"""Retrieval: chunking, the index (dense + BM25 + fusion, incremental), search and its errors."""

from __future__ import annotations

import json
import re

import pytest
from helpers import fails

from lmforge.core.errors import LMForgeError
from lmforge.rag.chunking import Document, chunk_document, headings, read_sources
from lmforge.rag.evaluate import evaluate, read_qa
from lmforge.rag.index import LOOKUP_WEIGHTS, QUESTION_WEIGHTS, RRF_K, Encoder, Index, build_index, rrf


def words(texts: list[str]) -> list[int]:
    """A stand-in token count: one token per word."""
    return [len(t.split()) for t in texts]


def check_lines(doc: Document, chunks) -> None:
    """Each whole-line chunk is exactly the lines it claims."""
    lines = doc.text.splitlines()
    for c in chunks:
        assert c.text == "\n".join(lines[c.start_line - 1:c.end_line]), c


def test_markdown_chunks_split_at_headings_with_exact_lines():
    text = "# Intro\n\none two three\nfour five\n\nsix seven\n\n## Setup\n\n```\n# not a heading\n```\n" \
           "eight nine ten\n"
    doc = Document("guide.md", text)
    chunks = chunk_document(doc, words, size=12, overlap=0)
    assert [(c.start_line, c.end_line, c.heading) for c in chunks] == [(1, 6, "Intro"), (8, 13, "Setup")]
    check_lines(doc, chunks)
    assert headings(text.splitlines(), "guide.md") == {0: ("Intro", 1), 7: ("Setup", 1)}


def test_packing_respects_size_and_overlaps():
    doc = Document("notes.txt", "\n".join(f"w{i} x y" for i in range(10)))  # one 30-word paragraph
    chunks = chunk_document(doc, words, size=9, overlap=3)
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 3), (3, 5), (5, 7), (7, 9), (9, 10)]
    check_lines(doc, chunks)
    assert all(len(c.text.split()) <= 9 for c in chunks)


def test_rst_python_and_jsonl_positions(tmp_path):
    rst = "=====\nTitle\n=====\n\nBody text.\n\nSection\n-------\n\nMore.\n"
    assert headings(rst.splitlines(), "a.rst") == {0: ("Title", 3), 6: ("Section", 2)}
    py = "import os\n\n\ndef f(x):\n    return x\n\n\nclass A:\n    pass\n"
    chunks = chunk_document(Document("m.py", py), words, size=50, overlap=0)
    assert [(c.start_line, c.end_line, c.heading) for c in chunks] == [(1, 1, ""), (4, 5, "def f(x)"),
                                                                       (8, 9, "class A")]
    (tmp_path / "d.jsonl").write_text('{"text": "first record"}\n\n{"text": "' + "w " * 30 + '"}\n')
    docs = read_sources([str(tmp_path)])[str(tmp_path / "d.jsonl")]
    chunks = [c for d in docs for c in chunk_document(d, words, size=10, overlap=0)]
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 1), (3, 3), (3, 3), (3, 3)]  # a long line in pieces
    assert all(len(c.text.split()) <= 10 for c in chunks)


def test_read_sources_errors(tmp_path):
    with pytest.raises(LMForgeError, match="no text"):
        read_sources([str(tmp_path)])
    (tmp_path / "x.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(LMForgeError, match="no .body. field|no .text. field"):
        read_sources([str(tmp_path)])


@pytest.fixture(scope="module")
def encoder():
    return Encoder("minilm", "cpu")


# Built so that each retriever alone misses: BM25 has no shared word for the paraphrases, and
# the encoder confuses look-alike order numbers.
CORPUS = {
    "cat.txt": "The feline dozed on the rug beside the fireplace all afternoon.",
    "car.txt": "Our automobile would not start, so we phoned a mechanic.",
    "rain.txt": "Heavy precipitation flooded the valley overnight.",
    "money.txt": "The bank raised its lending rate by half a percent.",
    "p1.txt": "Order form 7731: replacement hinge for cabinet doors, brass finish.",
    "p2.txt": "Order form 7713: replacement hinge for cabinet doors, steel finish.",
    "p3.txt": "Order form 1377: replacement hinge for cabinet doors, black finish.",
    "p4.txt": "Order form 3177: replacement hinge for cabinet doors, white finish.",
}
QUERIES = [("a cat sleeping on a carpet", "cat.txt"), ("my vehicle broke down and I called for repairs", "car.txt"),
           ("storm water covered the lowlands", "rain.txt"), ("interest on loans went up", "money.txt"),
           ("order 7713", "p2.txt"), ("order 3177", "p4.txt"), ("order 1377", "p3.txt"), ("form 7731", "p1.txt")]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    for name, text in CORPUS.items():
        (docs / name).write_text(text + "\n")
    build_index([str(docs)], root / "index", encoder)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "path": p}) + "\n" for q, p in QUERIES))
    return root


def test_hybrid_beats_each_retriever_alone(small_index, encoder):
    index = Index(small_index / "index", encoder)
    qa = read_qa(small_index / "qa.jsonl")
    r = {m: evaluate(index, qa, 1, m)["recall@1"] for m in ("hybrid", "rrf", "dense", "bm25")}
    assert r["hybrid"] == r["rrf"] == 1.0 and r["dense"] < 1.0 and r["bm25"] < 1.0, r
    hit = index.search("order 7713", 1)[0]
    assert (hit.chunk.path.endswith("p2.txt"), hit.chunk.start_line, hit.chunk.end_line) == (True, 1, 1)


def test_hybrid_follows_bm25_on_lookups_and_the_encoder_on_questions(small_index, encoder):
    index = Index(small_index / "index", encoder)
    top = lambda q, mode: [h.chunk.path for h in index.search(q, 3, mode)]  # noqa: E731
    # Every word of the query is in one chunk: a lexical lookup, and the hybrid follows BM25.
    for q in ("order form 7713 steel finish", "form 3177 white", "7731 brass"):
        assert index.hybrid_weights(q, index._bm25(q, 1)) == LOOKUP_WEIGHTS
        assert top(q, "hybrid")[0] == top(q, "bm25")[0]
    # Some words shared, but no chunk holds them all: a question, and the encoder leads.
    q = "a replacement hinge for my kitchen cupboard"
    assert 0 < index._coverage(q, index._bm25(q, 1)[0][0]) < 1
    assert index.hybrid_weights(q, index._bm25(q, 1)) == QUESTION_WEIGHTS
    n, v = len(index.chunks), encoder.embed([q])[0]
    fused = rrf([index._dense(v, n), index._bm25(q, n)], list(QUESTION_WEIGHTS))
    assert [h.n for h in index.search(q, 3)] == [i for i, _ in fused[:3]]
    # No shared word: BM25 has no evidence, and the hybrid is the encoder's ranking.
    q = "a cat sleeping on a carpet"
    assert index._bm25(q, 5) == [] and top(q, "hybrid") == top(q, "dense")


def test_rrf_matches_a_hand_computation():
    assert RRF_K == 60
    dense, sparse = [(7, 0.9), (3, 0.8), (5, 0.1)], [(3, 12.0), (9, 4.0)]
    plain = rrf([dense, sparse])
    assert [i for i, _ in plain] == [3, 7, 9, 5]
    assert [s for _, s in plain] == pytest.approx([1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63])
    weighted = rrf([dense, sparse], [1.0, 0.25])
    assert [i for i, _ in weighted] == [3, 7, 5, 9]
    assert [s for _, s in weighted] == pytest.approx([1 / 62 + 0.25 / 61, 1 / 61, 1 / 63, 0.25 / 62])
    assert rrf([[(4, 0.0)], [(2, 0.0)]]) == [(2, 1 / 61), (4, 1 / 61)]  # a tie goes to the lower id
    assert rrf([dense, []]) == [(i, 1 / (60 + r)) for r, (i, _) in enumerate(dense, 1)]


def test_question_weights_keep_the_encoders_answer_above_shared_word_noise():
    """The failure plain RRF has on paraphrased questions, in numbers: the encoder's first chunk
    (0) shares no word with the question, while BM25 returns chunks that share a common word,
    which the encoder ranked low (its 30th to 50th). Every chunk in both lists beats one in a
    single list under plain RRF; the hybrid's question weights keep the encoder's answer first,
    yet still let BM25 promote a chunk the encoder also ranked high."""
    dense = [(i, 1.0 - i / 100) for i in range(50)]
    noise = [(i, 5.0) for i in range(49, 29, -1)]
    assert rrf([dense, noise])[0][0] != 0
    assert rrf([dense, noise], list(QUESTION_WEIGHTS))[0][0] == 0
    assert rrf([dense, [(15, 9.0), *noise]], list(QUESTION_WEIGHTS))[0][0] == 15  # BM25's pick, the encoder's 16th
    assert rrf([dense, [(60, 9.0)]], list(QUESTION_WEIGHTS))[49][0] == 49  # BM25 alone never outranks the encoder
    # On lookups BM25's order stands; the encoder only breaks its ties.
    lookup = rrf([dense, [(40, 9.0), (41, 8.0), (7, 3.0)]], list(LOOKUP_WEIGHTS))
    assert [i for i, _ in lookup[:4]] == [40, 41, 7, 0]


def test_click_questions_name_entries_of_the_click_corpus(tmp_path):
    """benchmarks/data/click_questions.jsonl: every expected path is an entry the benchmark
    builds from the installed click, and the questions are words, not identifiers."""
    pytest.importorskip("click")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "rag_retrieval.py"
    spec = importlib.util.spec_from_file_location("rag_retrieval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert 100 <= bench.click_docs(tmp_path) <= 200
    names = {f.name for f in tmp_path.iterdir()}
    qa = read_qa(bench.CLICK_QUESTIONS)
    assert len(qa) >= 40 and all(set(q["paths"]) <= names for q in qa), [q for q in qa if not set(q["paths"]) <= names]
    assert not [q["question"] for q in qa if re.search(r"click|\w[._]\w|\(", q["question"])]


def test_incremental_reindex_touches_only_changed_files(tmp_path, encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.md", "b.md", "c.md"):
        (docs / name).write_text(f"# {name}\n\nText of {name}.\n")
    out = tmp_path / "index"
    first = build_index([str(docs)], out, encoder)
    assert len(first["embedded_files"]) == 3
    vectors_b = Index(out, encoder).vectors[1].copy()
    (docs / "a.md").write_text("# a\n\nNew text of a.\n")
    (docs / "c.md").unlink()
    (docs / "d.md").write_text("# d\n\nA new file.\n")
    embedded: list[str] = []
    real = encoder.embed
    encoder.embed = lambda texts: (embedded.extend(texts), real(texts))[1]
    try:
        second = build_index([str(docs)], out, encoder)
    finally:
        encoder.embed = real
    assert [p.rsplit("/", 1)[-1] for p in second["embedded_files"]] == ["a.md", "d.md"]
    assert [p.rsplit("/", 1)[-1] for p in second["removed_files"]] == ["c.md"]
    assert second["unchanged_files"] == 1 and len(embedded) == 2
    index = Index(out, encoder)
    assert [c.path.rsplit("/", 1)[-1] for c in index.chunks] == ["a.md", "b.md", "d.md"]
    assert (index.vectors[1] == vectors_b).all()  # b's vectors kept as they were
    assert index.manifest["counts"] == {"files": 3, "chunks": 3}
    assert not (tmp_path / "index.new").exists()


def test_index_errors(tmp_path, small_index, encoder, capsys):
    with pytest.raises(LMForgeError, match="not a retrieval index"):
        Index(tmp_path, encoder)
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(LMForgeError, match="not a retrieval index"):  # never replaces a non-index directory
        build_index([str(small_index / "docs")], tmp_path, encoder)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    other = small_index / "other"
    build_index([str(small_index / "docs" / "cat.txt")], other, encoder)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["encoder"]["fingerprint"] = "0" * 16  # as if built by another model
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LMForgeError, match="different model"):
        Index(other, encoder)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, "no text", "rag", "index", str(empty), "--out", str(tmp_path / "idx"), "--device", "cpu")
    assert not (tmp_path / "idx").exists()
    fails(capsys, "not a retrieval index", "rag", "search", str(tmp_path), "cat", "--device", "cpu")


def test_search_and_eval_cli(small_index, capsys):
    from lmforge.cli import main

    assert main(["rag", "search", str(small_index / "index"), "a cat sleeping on a carpet", "-k", "2", "--json",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["path"].endswith("cat.txt") and len(out["results"]) == 2
    assert {"start_line", "end_line", "score", "similarity", "heading", "text"} <= set(out["results"][0])
    assert main(["rag", "eval", str(small_index / "index"), "--qa", str(small_index / "qa.jsonl"), "-k", "1",
                 "--mode", "all", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hybrid"]["recall@1"] == 1.0 and out["hybrid"]["mrr"] == 1.0 and out["bm25"]["recall@1"] == 0.5
    assert set(out) == {"hybrid", "rrf", "dense", "bm25"}


def test_large_indexes_use_hnsw_with_the_same_answers(small_index, encoder, tmp_path, monkeypatch):
    import lmforge.rag.index as index_module

    monkeypatch.setattr(index_module, "EXACT_MAX", 4)  # as if the corpus were large
    build_index([str(small_index / "docs")], tmp_path / "hnsw", encoder)
    hnsw, flat = Index(tmp_path / "hnsw", encoder), Index(small_index / "index", encoder)
    assert hnsw.manifest["vector_index"] == "hnsw" and flat.manifest["vector_index"] == "flat"
    for q, _ in QUERIES:
        assert [h.chunk.path for h in hnsw.search(q, 3, "dense")] == [h.chunk.path for h in flat.search(q, 3, "dense")]
