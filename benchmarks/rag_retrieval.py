"""Retrieval quality on text we did not write, with the bundled MiniLM, on three query sets:

1. generated: the built-in `pydocs` corpus, queried with the first line of standard-library
   function docstrings, the function's name removed (deterministic; the right answer is that
   function's entry, pydocs:module.function). These queries copy the documents' words.
2. pydocs paraphrases (`benchmarks/data/pydocs_paraphrases.jsonl`): questions about the same
   corpus written by hand in other words than the docs'.
3. click questions (`benchmarks/data/click_questions.jsonl`): questions written by hand, in other
   words than the docs', about a second documentation set: the docstrings of the `click`
   package's public API (functions, classes and their documented methods, ~140 entries), one
   Markdown file per entry (`click.NAME.md`), built from the click installed here (found with
   importlib: nothing is downloaded).

For each set it prints recall@1, recall@5 and MRR of every search mode (dense, bm25, rrf, hybrid);
for the generated set also the query latency of each mode, end to end.

    python benchmarks/rag_retrieval.py [--every 8] [--out runs/rag-bench] [--qa more.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import re
import tempfile
import time
from pathlib import Path

from lmforge.rag.chunking import read_sources
from lmforge.rag.evaluate import evaluate, read_qa
from lmforge.rag.index import MODES, Encoder, Index, build_index

DATA = Path(__file__).parent / "data"
PARAPHRASES = DATA / "pydocs_paraphrases.jsonl"
CLICK_QUESTIONS = DATA / "click_questions.jsonl"
FUNCTION = re.compile(r"^([A-Za-z_][\w.]*\.(\w+))\(")
REPORTED = ("dense", "bm25", "rrf", "hybrid")
MIN_DOC_CHARS = 40  # as pydocs: shorter docstrings are mostly boilerplate


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


def _signature(obj) -> str:
    """The call signature without annotations (they are long and say little to a reader)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def click_docs(out: Path) -> int:
    """Write the installed click's API docstrings to `out`, one `click.NAME.md` per entry: the
    public names of the package and the public methods and properties that their classes define
    with a docstring of their own. Returns the number of entries."""
    click = importlib.import_module("click")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("click.*.md"):  # a previous run's, perhaps of another click
        old.unlink()
    entries: dict[str, str] = {}

    def add(name: str, title: str, doc: str | None) -> None:
        if doc and len(doc := inspect.cleandoc(doc)) >= MIN_DOC_CHARS:
            entries[name] = f"# {title}\n\n{doc}\n"

    for name in sorted(n for n in dir(click) if not n.startswith("_")):
        obj = getattr(click, name)
        if inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith("click"):
            continue
        kind = "class " if inspect.isclass(obj) else ""
        add(name, f"{kind}click.{name}{_signature(obj)}", obj.__doc__)
        if not inspect.isclass(obj):
            continue
        for member, value in sorted(vars(obj).items()):
            if member.startswith("_"):
                continue
            value = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            if inspect.isfunction(value):
                add(f"{name}.{member}", f"click.{name}.{member}{_signature(value)}", value.__doc__)
            elif isinstance(value, property):
                add(f"{name}.{member}", f"click.{name}.{member}", value.__doc__)
    for name, text in entries.items():
        (out / f"click.{name}.md").write_text(text, encoding="utf-8")
    return len(entries)


def report(index: Index, name: str, qa: list[dict], latency: bool = False) -> None:
    print(f"\n{name}: {len(qa)} queries")
    print(f"{'mode':8} {'recall@1':>9} {'recall@5':>9} {'MRR':>7}" + (f" {'ms/query':>9}" if latency else ""))
    for mode in REPORTED:
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
    assert set(REPORTED) <= set(MODES)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=8, help="use every N-th function as a query")
    ap.add_argument("--out", help="directory for the indexes (default: a temporary one); rebuilt incrementally")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qa", action="append", default=[], help="more query files about pydocs (JSONL, as "
                                                              "`lmforge rag eval --qa`) to score; repeatable")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp())
    encoder = Encoder("minilm", a.device)
    start = time.perf_counter()
    stats = build_index(["pydocs"], out / "pydocs-index", encoder)
    index_s = time.perf_counter() - start
    index = Index(out / "pydocs-index", encoder)
    qa = make_queries(a.every)
    print(f"pydocs: {stats['files']:,} entries, {stats['chunks']:,} chunks, indexed in {index_s:.1f} s "
          f"({stats['chunks'] / index_s:.1f} chunks/s)")
    report(index, "pydocs, generated (first docstring lines, name removed)", qa, latency=True)
    for path in [str(PARAPHRASES), *a.qa]:
        report(index, f"pydocs, {Path(path).name}", read_qa(path))
    print("example generated queries:", *[f"  {q['question']!r} -> {q['paths'][0]}" for q in qa[:3]], sep="\n")

    entries = click_docs(out / "click-docs")
    stats = build_index([str(out / "click-docs")], out / "click-index", encoder)
    print(f"\nclick {importlib.metadata.version('click')}: {entries} entries, {stats['chunks']:,} chunks")
    report(Index(out / "click-index", encoder), f"click, {CLICK_QUESTIONS.name}", read_qa(CLICK_QUESTIONS))


if __name__ == "__main__":
    main()
