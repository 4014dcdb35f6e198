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


def test_special_and_plain_encoding_from_many_threads(tok):
    """`special` must not be a setting shared between threads: a server encodes concurrently."""
    import sys
    import threading

    text = f"a{EOT}b <|im_start|>user " * 20
    want = {True: tok.encode(text, special=True), False: tok.encode(text, special=False)}
    assert want[True] != want[False]
    wrong: list[bool] = []

    def hammer(special: bool) -> None:
        for _ in range(150):
            if tok.encode(text, special=special) != want[special]:
                wrong.append(special)
            if tok.encode_batch([text, text], special=special) != [want[special]] * 2:
                wrong.append(special)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up quickly
    try:
        threads = [threading.Thread(target=hammer, args=(i % 2 == 0,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} encodings came out with the other thread's special-token setting"


def test_pieces_show_partial_characters_as_bytes(tok):
    ids = tok.encode("héllo 🙂")
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # what decoding piece by piece shows
    pieces = [tok.piece(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "<0xC3><0xA9>" in "".join(pieces) and "<0xF0><0x9F><0x99><0x82>" in "".join(pieces)
    assert tok.piece(tok.eot_id) == EOT and tok.piece(tok.encode("\n")[0]) == "\n"
    merged = Tokenizer.train(["café déjà " * 50] * 20, 280, show_progress=False)
    assert [merged.piece(i) for i in merged.encode("café")] == ["café"]  # whole characters: their text
    with pytest.raises(LMForgeError, match="outside the vocabulary"):
        tok.piece(10**6)


def test_piece_falls_back_to_byte_tokens_and_decoding():
    from hf_fixtures import sentencepiece_style

    sp = Tokenizer(sentencepiece_style())
    pieces = [sp.piece(i) for i in sp.encode("hello 🙂")]
    assert "<0xF0>" in pieces and "hello" in "".join(pieces)


def test_printable_escapes_control_characters():
    from lmforge.text.tokenizer import printable

    assert printable("a\nb\tc d\x00") == "a\\nb\\tc d\\x00"
    assert printable("é 🙂") == "é 🙂"


def test_small_corpus_warns_about_the_vocabulary(capsys):
    small = Tokenizer.train(["a tiny corpus, a tiny corpus"] * 3, 8192, show_progress=False)
    err = capsys.readouterr().err
    assert small.vocab_size < 8192
    assert err.count("\n") == 1 and "8,192" in err and f"only {small.vocab_size:,}" in err
    Tokenizer.train(make_docs(40), 300, show_progress=False)
    assert capsys.readouterr().err == ""


def test_tokenizer_can_be_copied(tok):
    import copy

    twin = copy.deepcopy(tok)
    assert twin.encode(f"a{EOT}", special=False) == tok.encode(f"a{EOT}", special=False)


def test_raw_bytes_of_partial_characters(tmp_path):
    from lmforge.text.tokenizer import Tokenizer as Tok

    tok = Tok.train(["héllo 🙂 wörld"] * 20, 300, show_progress=False)
    ids = tok.encode("héllo 🙂")
    assert b"".join(tok.raw_bytes(i) for i in ids) == "héllo 🙂".encode()
