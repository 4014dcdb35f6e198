"""Token ids to text, piece by piece, for streaming: only whole UTF-8 characters go out, and text
that might still turn out to start a stop string is held back until it is known not to."""

from __future__ import annotations

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
    set once a stop string appears (the text ends before it); `flush` returns what was held back."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str] | None = None) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hit = min((text.find(s) for s in self.stops if s in text), default=-1)
        if hit >= 0:
            self.text, self.stopped = text[:hit], True
            return self.flush()
        self.text = text
        if text.endswith("\ufffd"):  # wait for the rest of the character
            return ""
        safe = len(text) - held_back(text, self.stops)
        if safe <= self.emitted:
            return ""
        out, self.emitted = text[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
