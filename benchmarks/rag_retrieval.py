"""Retrieval quality on text we did not write: the built-in `pydocs` corpus with the bundled MiniLM.

The query set is generated deterministically: for standard-library functions, the first line of
the docstring with the function's name removed; the right answer is that function's entry
(pydocs:module.function). Prints recall@1, recall@5 and MRR for dense, BM25 and hybrid, the index
time and the query latency of each mode. Then the same for a query set written by hand
(`benchmarks/data/pydocs_paraphrases.jsonl`): questions in other words than the docs', the case
where the encoder is needed.

    python benchmarks/rag_retrieval.py [--every 8] [--out runs/pydocs-index] [--qa more.jsonl]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from lmforge.rag.chunking import read_sources
from lmforge.rag.evaluate import evaluate, read_qa
from lmforge.rag.index import Encoder, Index, build_index

PARAPHRASES = Path(__file__).parent / "data" / "pydocs_paraphrases.jsonl"
FUNCTION = re.compile(r"^([A-Za-z_][\w.]*\.(\w+))\(")


def make_queries(every: int) -> list[dict]:
    """Every `every`-th function with a usable one-line summary (ambiguous summaries dropped)."""
    entries = []
    for path, docs in read_sources(["pydocs"]).items():
        text = docs[0].text
        m = FUNCTION.match(text)
        if not m or "#" in path:
            continue
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        summary = body.strip().split("\n", 1)[0]
        if m.group(2).lower() in ("__init__",) or len(summary) < 25 or summary.endswith(")"):
            continue  # a signature repeated as the first line says nothing new
        query = re.sub(rf"\b{re.escape(m.group(1))}\b|\b{re.escape(m.group(2))}\b", "", summary).strip(" .:")
        entries.append((query, path))
    counts: dict[str, int] = {}
    for q, _ in entries:
        counts[q] = counts.get(q, 0) + 1
    entries = [(q, p) for q, p in entries if counts[q] == 1 and len(q) >= 20]
    return [{"question": q, "paths": [p], "answer": None} for q, p in entries[::every]]


def report(index: Index, name: str, qa: list[dict], latency: bool = False) -> None:
    print(f"\n{name}: {len(qa)} queries")
    print(f"{'mode':8} {'recall@1':>9} {'recall@5':>9} {'MRR':>7}" + (f" {'ms/query':>9}" if latency else ""))
    for mode in ("dense", "bm25", "hybrid"):
        r = evaluate(index, qa, 5, mode)
        line = f"{mode:8} {r['recall@1']:9.3f} {r['recall@5']:9.3f} {r['mrr']:7.3f}"
        if latency:
            sample = qa[:50]
            t0 = time.perf_counter()
            for q in sample:
                index.search(q["question"], 5, mode)  # end to end: embedding the query included
            line += f" {(time.perf_counter() - t0) / len(sample) * 1000:9.1f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=8, help="use every N-th function as a query")
    ap.add_argument("--out", help="index directory (default: a temporary one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qa", action="append", default=[str(PARAPHRASES)],
                    help="more query files (JSONL, as `lmforge rag eval --qa`) to score; repeatable")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "pydocs-index"
    encoder = Encoder("minilm", a.device)
    start = time.perf_counter()
    stats = build_index(["pydocs"], out, encoder)
    index_s = time.perf_counter() - start
    index = Index(out, encoder)
    qa = make_queries(a.every)
    print(f"pydocs: {stats['files']:,} entries, {stats['chunks']:,} chunks, indexed in {index_s:.1f} s "
          f"({stats['chunks'] / index_s:.1f} chunks/s); {len(qa)} queries")
    report(index, "generated (first docstring lines, name removed)", qa, latency=True)
    for path in a.qa:
        report(index, path, read_qa(path))
    print("example queries:", *[f"  {q['question']!r} -> {q['paths'][0]}" for q in qa[:3]], sep="\n")


if __name__ == "__main__":
    main()
