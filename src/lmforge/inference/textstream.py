"""Token ids to text, piece by piece, for streaming: only whole UTF-8 characters go out, and text
that might still turn out to start a stop string is held back until it is known not to."""

from __future__ import annotations

from collections.abc import Collection

from ..text.tokenizer import Tokenizer


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn out to start a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


class TextStream:
    """Feed token ids with `add`; each call returns the text that is now safe to show. `stopped` is
    set once a stop string appears (the text ends before it; `stop` is that string); `flush`
    returns what was held back.

    Decoding is incremental, so a long answer costs O(length), not O(length²): each step decodes a
    short window of ids twice, with and without the new token, and keeps the difference (which
    also keeps whatever a tokenizer's decoder does at the start of a text, e.g. strip a space).
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str] | None = None, skip: Collection[int] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.skip = skip  # ids that add no text (see `hidden_ids`)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False
        self.stop: str | None = None
        self._start = self._read = 0  # the window: ids[_start:_read] are decoded into the text already

    def add(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._start:self._read])
        after = self.tokenizer.decode(self.ids[self._start:])
        if after.endswith("\ufffd") or len(after) <= len(before):  # wait for the rest of the character
            return ""
        self._start, self._read = self._read, len(self.ids)
        grown = len(self.text)
        self.text += after[len(before):]
        # a stop string can only appear where it overlaps the new text
        since = max(0, grown - self.longest_stop + 1)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, since)) >= 0]
        if hits:
            hit, self.stop = min(hits)
            self.text, self.stopped = self.text[:hit], True
            return self.flush()
        safe = len(self.text) - held_back(self.text, self.stops)
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        """The rest: text held back for stop strings, and a last character still incomplete."""
        if self._read < len(self.ids) and not self.stopped:
            before = self.tokenizer.decode(self.ids[self._start:self._read])
            self.text += self.tokenizer.decode(self.ids[self._start:])[len(before):]
            self._start = self._read = len(self.ids)
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def hidden_ids(tokenizer: Tokenizer, encoder_decoder: bool) -> set[int]:
    """Tokens an answer shows no text for: an encoder-decoder's special tokens (BART's decoder
    writes <s> first), but not T5's sentinels, which are what span-corruption models answer with."""
    return tokenizer.special_ids - set(tokenizer.sentinel_ids()) if encoder_decoder else set()
