"""Byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from helpers import make_docs

from lmforge.core.errors import LMForgeError
from lmforge.text.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, auto_vocab_size

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "déjà vu — naïve café", "emoji 😀🎉 and 中文",
         "def f(x):\n    return x ** 2\n\n\n", "tabs\tand\r\nwindows newlines", ""]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(100), 400, show_progress=False)


def test_roundtrip_is_exact(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_reserved_and_parsed(tok):
    assert tok.eot_id == 0 and tok.id_to_token(0) == EOT
    assert all(tok.token_id(t) is not None for t in SPECIAL_TOKENS)
    ids = tok.encode(f"a{EOT}b")
    assert tok.eot_id in ids
    as_text = tok.encode(f"a{EOT}b", special=False)  # documents that merely mention it
    assert tok.eot_id not in as_text and tok.decode(as_text) == f"a{EOT}b"


def test_vocab_size_and_save_load(tok, tmp_path):
    assert tok.vocab_size == 400
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path)
    assert again.encode("The new module returns") == tok.encode("The new module returns")


def test_token_bytes_sum_to_utf8_length(tok):
    lengths = tok.token_bytes()
    for text in TEXTS:
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode())
    assert lengths[tok.eot_id] == 0


def test_auto_vocab_size_grows_with_corpus():
    assert auto_vocab_size(10_000) == 512
    assert auto_vocab_size(2_000_000) == 4096
    assert auto_vocab_size(10**10) == 32768


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(LMForgeError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(LMForgeError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path / "missing")
