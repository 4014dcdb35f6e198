"""Preference data: which of several answers to the same prompt people liked better.

One reader for three JSONL forms (strict: an unknown field is an error, so a typo is not silently
ignored):

    {"prompt": P, "chosen": A, "rejected": B, "margin": 1.0}     # a pair; margin is optional
    {"prompt": P, "responses": [best, ..., worst], "ranks": [1, 1, 2]}
                                  # a ranking of K answers: all C(K, 2) ordered pairs; the optional
                                  # ranks give ties (equal ranks form no pair)
    either of them with "messages": [...] (the chat so far) instead of "prompt"

An optional "meta" object is carried along untouched (`lmforge rank` notes its sampling there).
Prompt files for RLHF hold {"prompt": P} or {"messages": [...]} per line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import LMForgeError
from ..text.templates import Template, encode_segments, validate_messages
from ..text.tokenizer import Tokenizer
from .records import read_records

PAIR_FIELDS = {"chosen", "rejected", "margin"}
RANKING_FIELDS = {"responses", "ranks"}
COMMON_FIELDS = {"prompt", "messages", "meta"}


@dataclass
class Ranking:
    """Answers to one conversation, best first; ranks[i] is answer i's place (1 = best, equal = tie)."""

    conv: list[dict]
    responses: list[str]
    ranks: list[int]
    margin: float = 0.0
    meta: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs: every two answers of different rank."""
        n = len(self.responses)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]


def read_conversation(r: dict, where: str) -> list[dict]:
    """The prompt of a record as a conversation: {"prompt": str} or {"messages": [...]} ending
    with a user turn (the answer is what comes next)."""
    if ("prompt" in r) == ("messages" in r):
        raise LMForgeError(f"{where}: a record needs exactly one of 'prompt' and 'messages'")
    if "prompt" in r:
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise LMForgeError(f"{where}: 'prompt' must be a non-empty string")
        return [{"role": "user", "content": r["prompt"]}]
    conv = validate_messages(r["messages"], where)
    if conv[-1]["role"] != "user":
        raise LMForgeError(f"{where}: 'messages' must end with a user turn (the answers come next)")
    return conv


def _texts(values, name: str, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LMForgeError(f"{where}: '{name}' must be a list of strings")
    return values


def parse_preference(r, where: str) -> Ranking:
    """One preference record (any of the forms above) as a `Ranking`, or a one-line error."""
    if not isinstance(r, dict):
        raise LMForgeError(f"{where}: expected a JSON object")
    is_pair = bool(PAIR_FIELDS & r.keys())
    allowed = COMMON_FIELDS | (PAIR_FIELDS if is_pair else RANKING_FIELDS)
    unknown = sorted(r.keys() - allowed)
    if unknown:
        raise LMForgeError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (a preference record has "
                           "prompt or messages, and chosen + rejected [+ margin] or responses [+ ranks])")
    conv = read_conversation(r, where)
    meta = r.get("meta", {})
    if not isinstance(meta, dict):
        raise LMForgeError(f"{where}: 'meta' must be an object")
    if is_pair:
        missing = [k for k in ("chosen", "rejected") if k not in r]
        if missing:
            raise LMForgeError(f"{where}: the record has no {missing[0]!r} answer")
        chosen, rejected = _texts([r["chosen"], r["rejected"]], "chosen/rejected", where)
        if chosen == rejected:
            raise LMForgeError(f"{where}: 'chosen' and 'rejected' are the same text")
        margin = r.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise LMForgeError(f"{where}: 'margin' must be a number")
        return Ranking(conv, [chosen, rejected], [1, 2], float(margin), meta)
    if "responses" not in r:
        raise LMForgeError(f"{where}: the record has neither 'chosen'/'rejected' nor 'responses'")
    responses = _texts(r["responses"], "responses", where)
    if len(responses) < 2:
        raise LMForgeError(f"{where}: a ranking needs at least 2 responses (got {len(responses)})")
    ranks = r.get("ranks", list(range(1, len(responses) + 1)))
    if (not isinstance(ranks, list) or len(ranks) != len(responses)
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in ranks)
            or any(b < a for a, b in zip(ranks, ranks[1:]))):
        raise LMForgeError(f"{where}: 'ranks' must be one integer per response, best (lowest) first")
    ranking = Ranking(conv, responses, ranks, 0.0, meta)
    if not ranking.pairs():
        raise LMForgeError(f"{where}: every response is tied: nothing is preferred")
    return ranking


def read_preferences(path: str | Path) -> list[Ranking]:
    """Every record of a preference file (JSONL or a JSON array), each as a `Ranking`."""
    return [parse_preference(r, f"{path}:{lineno}") for lineno, r in read_records(path)]


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts for sampling (RLHF, `lmforge rank`): {"prompt": P} or {"messages": [...]} per line;
    the other fields of a preference record are allowed and ignored."""
    out = []
    for lineno, r in read_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(r, dict):
            raise LMForgeError(f"{where}: expected a JSON object")
        out.append(read_conversation(r, where))
    return out


def encode_answer(tokenizer: Tokenizer, template: Template, conv: list[dict], answer: str,
                  max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation followed by `answer` as the assistant's turn (with its
    end-of-turn marker), and per token whether it belongs to the answer. Too long, the start of
    the prompt is cut off (`max_len` tokens are kept): the answer is what is judged."""
    ids, trainable = encode_segments(tokenizer, template.render(conv + [{"role": "assistant", "content": answer}],
                                                                tokenizer))
    return ids[-max_len:], trainable[-max_len:]
