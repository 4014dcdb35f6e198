"""Reading text sources, and the built-in pydocs corpus."""

from __future__ import annotations

import json

import pytest

from lmforge.core.errors import LMForgeError
from lmforge.text.corpus import load_corpus, pydocs


def test_files_directories_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("# second")
    (sub / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored in directories
    (sub / ".hidden.txt").write_text("hidden")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth", "id": 2}) + "\n")
    corpus = load_corpus([str(tmp_path / "a.txt"), str(sub), str(jl)])
    assert corpus.documents == ["first document", "# second", "third", "fourth"]
    assert load_corpus([str(tmp_path)]).documents == ["first document", "third", "fourth", "# second"]


def test_jsonl_custom_field_and_errors(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"body": "hello"}) + "\n")
    assert load_corpus([str(jl)], text_field="body").documents == ["hello"]
    with pytest.raises(LMForgeError, match="no 'text' field"):
        load_corpus([str(jl)])
    jl.write_text("{not json\n")
    with pytest.raises(LMForgeError, match="invalid JSON"):
        load_corpus([str(jl)])


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(LMForgeError, match="no such file"):
        load_corpus([str(tmp_path / "nope.txt")])


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(LMForgeError, match="empty"):
        load_corpus([str(tmp_path)])


def test_binary_file_is_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("real text")
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    corpus = load_corpus([str(tmp_path)])
    assert corpus.documents == ["real text"]
    assert "skipping binary file" in capsys.readouterr().err
    with pytest.raises(LMForgeError, match="empty"):  # nothing left: fatal
        load_corpus([str(tmp_path / "blob.txt")])


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me and more".encode("latin-1"))
    corpus = load_corpus([str(tmp_path / "latin1.txt")])
    assert corpus.documents == ["caf\ufffd cr\ufffdme and more"]
    assert "2 invalid UTF-8 sequence(s)" in capsys.readouterr().err


def test_pydocs_is_deterministic_deduplicated_and_about_2mb():
    docs = pydocs()
    assert docs == pydocs()
    assert len(docs) == len(set(docs)) > 1000
    size = sum(len(d.encode()) for d in docs)
    assert 1.0e6 < size < 4.0e6
    assert any(d.startswith("Module json") for d in docs)
    assert not any(" at 0x" in d.split("\n", 1)[0] for d in docs)  # no memory addresses in signatures


def test_the_corpus_says_what_it_read(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n{"text": "three"}\n')
    assert load_corpus([str(tmp_path)]).describe() == "2 files: 3 documents, 0.00 MB"


def test_files_that_are_not_text_are_counted_not_skipped_silently(tmp_path, capsys):
    """`rag index docs/` with pictures beside the text (it used to pass over them without a word)."""
    from lmforge.rag.chunking import read_sources

    (tmp_path / "guide.md").write_text("# Guide\n\nRead me.\n")
    (tmp_path / "shot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "manual.pdf").write_bytes(b"%PDF-1.4")
    assert list(read_sources([str(tmp_path)])) == [str(tmp_path / "guide.md")]
    err = capsys.readouterr().err
    assert f"warning: skipped 3 file(s) under {tmp_path} that are not text (2 .png, 1 .pdf)" in err
    load_corpus([str(tmp_path)])  # pretraining data reads the same way
    assert "(2 .png, 1 .pdf)" in capsys.readouterr().err
