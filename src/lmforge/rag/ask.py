"""Answers with their sources: retrieve, fence the chunks as numbered sources, ask the model to
cite them as [n], and list what it cited."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from ..core.errors import LMForgeError
from ..inference.client import Generator
from .fence import FENCE_RULE, fence, new_marker
from .index import Hit, Index

CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
DONT_KNOW = "I don't know"


def ask_messages(question: str, hits: list[Hit], marker: str) -> list[dict]:
    system = ("Answer the question using only the numbered sources. Cite each source you use as [n], e.g. [1]. "
              f"If the sources do not contain the answer, say \"{DONT_KNOW}.\" " + FENCE_RULE)
    sources = "\n\n".join(fence(f"{h.chunk.where} ({h.chunk.heading})\n{h.chunk.text}" if h.chunk.heading
                                else f"{h.chunk.where}\n{h.chunk.text}", marker, f"SOURCE {n}")
                          for n, h in enumerate(hits, 1))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


def citations(answer: str, n_sources: int) -> list[int]:
    """The source numbers cited in `answer` ([2], [1, 3]), in order of first citation; numbers
    that name no source are ignored."""
    seen: list[int] = []
    for m in CITATION.finditer(answer):
        for n in (int(x) for x in m.group(1).split(",")):
            if 1 <= n <= n_sources and n not in seen:
                seen.append(n)
    return seen


def ask(index: Index, generator: Generator, question: str, k: int = 4, mode: str = "hybrid",
        min_score: float | None = None, max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
        on_text: Callable[[str], None] | None = None) -> dict:
    """{answer, citations: [{n, path, start_line, end_line, score}], retrieved: [...], refused}.
    With `min_score`, a best cosine similarity below it refuses without asking the model."""
    if not question.strip():
        raise LMForgeError("the question is empty")
    hits = index.search(question, k, mode)
    retrieved = [{"n": n, **h.to_dict()} for n, h in enumerate(hits, 1)]
    best = max((h.similarity for h in hits), default=0.0)
    if not hits or (min_score is not None and best < min_score):
        why = "the index is empty" if not hits else f"best similarity {best:.3f} is below --min-score {min_score:g}"
        return {"answer": f"{DONT_KNOW}: the sources do not cover this ({why}).", "citations": [],
                "retrieved": retrieved, "refused": True}
    marker = new_marker(random.Random(seed) if seed is not None else None)  # --seed: the same prompt each run
    answer = generator.chat(ask_messages(question, hits, marker), max_tokens=max_tokens,
                            temperature=temperature, seed=seed, on_text=on_text)
    cited = [{"n": n, "path": hits[n - 1].chunk.path, "start_line": hits[n - 1].chunk.start_line,
              "end_line": hits[n - 1].chunk.end_line, "score": round(hits[n - 1].score, 6)}
             for n in citations(answer, len(hits))]
    return {"answer": answer, "citations": cited, "retrieved": retrieved, "refused": False}


def sources_block(result: dict) -> str:
    if not result["citations"]:
        return "Sources: none cited"
    return "Sources:\n" + "\n".join(f"  [{c['n']}] {c['path']}:{c['start_line']}-{c['end_line']}"
                                    for c in result["citations"])
