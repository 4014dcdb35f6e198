"""`TextStream`: streamed pieces add up to the whole decode, stop strings cut exactly."""

from __future__ import annotations

import pytest

from lmforge.inference.textstream import TextStream
from lmforge.text.tokenizer import Tokenizer

TEXT = "Größe: 42 km² — naïve café 東京タワー 🙂🙂 def f(x):\n    return x  # done\n\nThe end."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT[:20], "plain words and more words", "def g(y): return y"], vocab_size=300,
                           show_progress=False)


def stream(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(tok, stops)
    out = []
    for i in ids:
        out.append(s.add(i))
        if s.stopped:
            break
    out.append(s.flush())
    return out, s


def test_pieces_add_up_to_the_whole_decode(tok):
    ids = tok.encode(TEXT)
    pieces, s = stream(tok, ids, [])
    assert "".join(pieces) == tok.decode(ids) == s.text
    assert not any("\ufffd" in p for p in pieces)  # whole characters only
    cut, _ = stream(tok, ids[:-1] + tok.encode("\xff")[:1], [])  # ends inside a character: flushed anyway
    assert "".join(cut) == tok.decode(ids[:-1] + tok.encode("\xff")[:1])


@pytest.mark.parametrize("stop", ["café", "\n\n", "🙂", "x)", "The end."])
def test_stop_strings_cut_exactly(tok, stop):
    pieces, s = stream(tok, tok.encode(TEXT), [stop, "never there"])
    assert s.stopped and "".join(pieces) == TEXT[:TEXT.index(stop)]
