"""Retrieval quality: recall@k and mean reciprocal rank against expected sources.

A query set is JSONL, one `{"question": ..., "path": ...}` per line (or `"paths": [...]`, or
`"answer": "a substring the right chunk contains"`). A retrieved chunk is relevant when its path is
an expected path (or ends with /PATH) or its text contains the expected answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.errors import LMForgeError
from .chunking import Chunk
from .index import Index


def read_qa(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"no such query file: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise LMForgeError(f"{path}:{lineno}: not JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
            raise LMForgeError(f"{path}:{lineno}: needs a non-empty string field 'question'")
        paths = rec.get("paths") or ([rec["path"]] if "path" in rec else [])
        answer = rec.get("answer")
        if not paths and not answer:
            raise LMForgeError(f"{path}:{lineno}: needs 'path', 'paths' or 'answer' (what a right chunk has)")
        out.append({"question": rec["question"], "paths": [str(p) for p in paths], "answer": answer})
    if not out:
        raise LMForgeError(f"{path} holds no queries")
    return out


def relevant(chunk: Chunk, qa: dict) -> bool:
    if any(chunk.path == p or chunk.path.endswith("/" + p.lstrip("./")) for p in qa["paths"]):
        return True
    return bool(qa["answer"]) and qa["answer"] in chunk.text


def evaluate(index: Index, qa: list[dict], k: int = 5, mode: str = "hybrid") -> dict:
    """{"mode", "k", "queries", "recall@1", "recall@k", "mrr"} (MRR counts ranks up to k)."""
    vectors = index.encoder.embed([q["question"] for q in qa])  # one batch for every query
    ranks = []
    for q, v in zip(qa, vectors):
        hits = index.search_vector(q["question"], v, k, mode)
        ranks.append(next((r for r, h in enumerate(hits, 1) if relevant(h.chunk, q)), None))
    found = np.array([r is not None for r in ranks])
    return {"mode": mode, "k": k, "queries": len(qa), "recall@1": round(float(np.mean([r == 1 for r in ranks])), 4),
            f"recall@{k}": round(float(found.mean()), 4),
            "mrr": round(float(np.mean([1.0 / r if r else 0.0 for r in ranks])), 4)}
