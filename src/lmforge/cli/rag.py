"""`lmforge rag index|search|ask|eval` and `lmforge agent`: flags (dataclasses) and verb functions.

Torch-free at import: the library is imported inside each function, so `--help` answers at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from ..core.errors import LMForgeError
from .args import device_flag, jsonl_text_flag

MODES = ["hybrid", "rrf", "dense", "bm25"]
MODE_HELP = ("hybrid (dense + BM25 fused by weighted reciprocal rank: BM25 leads when one chunk holds every "
             "query word, the encoder otherwise), rrf (plain reciprocal-rank fusion), dense (embeddings), or "
             "bm25 (words)")


@dataclass
class RagIndexArgs:
    """Build or update a retrieval index over your documents: chunks split on headings and
    paragraphs, dense vectors from an encoder (FAISS) and a BM25 index beside them. Re-running
    re-embeds only new or changed files and drops files that are gone."""

    docs: list[str] = arg([], "files, directories (recursive), .jsonl files, or 'pydocs'", positional=True)
    out: str = arg(None, "index directory to create or update")
    encoder: str = arg("minilm", "encoder model directory, or minilm (the bundled all-MiniLM-L6-v2)")
    chunk_tokens: int = arg(200, "target chunk size in encoder tokens", ge=8)
    overlap: int = arg(32, "tokens shared by consecutive chunks of one section", ge=0)
    text_field: str = jsonl_text_flag()
    rebuild: bool = arg(False, "re-embed everything (e.g. to switch encoders)")
    device: str = device_flag()


@dataclass
class RagSearchArgs:
    """Search an index: the best chunks for a query, with scores and path:start-end."""

    index: str = arg(None, "index directory (from `lmforge rag index`)", positional=True)
    query: str = arg(None, "what to look for", positional=True)
    k: int = arg(5, "how many chunks", short="-k", ge=1, le=1000)
    mode: str = arg("hybrid", MODE_HELP, choices=MODES)
    encoder: str | None = arg(None, "check that this encoder is the one that built the index (default: its own)")
    json: bool = arg(False, "print one JSON object")
    device: str = device_flag()


@dataclass
class GeneratorArgs:
    """Which model answers: a local directory or an OpenAI-compatible server"""

    model: str | None = arg(None, "local model directory (or Hugging Face checkpoint)")
    api: str | None = arg(None, "OpenAI-compatible server URL instead, e.g. http://127.0.0.1:8000/v1")
    api_model: str | None = arg(None, "with --api: the model name (default: the server's first)")
    api_key: str | None = arg(None, "with --api: the API key")
    timeout: float = arg(60.0, "with --api: seconds to wait for the server", gt=0)
    max_tokens: int = arg(256, "longest answer (per step for agents), in tokens", ge=1)
    temperature: float = arg(0.0, "randomness (0 = greedy)", ge=0)
    seed: int | None = arg(None, "sampling seed")
    device: str = device_flag()

    def generator(self):
        from ..inference.client import open_generator

        return open_generator(self.model, self.api, self.api_model, self.api_key, self.device, self.timeout)


@dataclass
class RagAskArgs(GeneratorArgs):
    """Answer a question from an index, citing the sources it used. The retrieved chunks go to
    the model as numbered, fenced sources (data, never instructions); the answer streams, then
    the cited chunks are listed with path:lines."""

    index: str = arg(None, "index directory (from `lmforge rag index`)", positional=True)
    question: str = arg(None, "the question", positional=True)
    k: int = arg(4, "how many chunks to give the model", short="-k", ge=1, le=50)
    mode: str = arg("hybrid", MODE_HELP, choices=MODES)
    min_score: float | None = arg(None, "refuse to answer when the best chunk's cosine similarity is below this "
                                  "(a guard against answers the sources do not support)", ge=-1, le=1)
    json: bool = arg(False, "print one JSON object: {answer, citations, retrieved}")


@dataclass
class RagEvalArgs:
    """Measure retrieval on a query set (JSONL of {"question", "path"|"paths"|"answer"}): recall@1,
    recall@k and MRR, as one JSON object."""

    index: str = arg(None, "index directory", positional=True)
    qa: str = arg(None, "query set (.jsonl)")
    k: int = arg(5, "depth for recall@k and MRR", short="-k", ge=1, le=1000)
    mode: str = arg("hybrid", MODE_HELP + "; all: each of them", choices=[*MODES, "all"])
    device: str = device_flag()


def rag_index(ns) -> None:
    a = from_namespace(RagIndexArgs, ns)
    if not a.out:
        raise LMForgeError("--out INDEX is required")
    from ..rag.index import Encoder, build_index

    stats = build_index(a.docs, a.out, Encoder(a.encoder, a.device), a.chunk_tokens, a.overlap, a.text_field,
                        a.rebuild)
    print(f"{a.out}: {stats['files']:,} files, {stats['chunks']:,} chunks ({len(stats['embedded_files']):,} files "
          f"embedded, {stats['unchanged_files']:,} unchanged, {len(stats['removed_files']):,} removed)",
          file=sys.stderr)


def rag_search(ns) -> None:
    a = from_namespace(RagSearchArgs, ns)
    from ..rag.index import Index

    hits = Index(a.index, a.encoder, a.device).search(a.query, a.k, a.mode)
    if a.json:
        print(json.dumps({"query": a.query, "mode": a.mode, "results": [h.to_dict() for h in hits]},
                         ensure_ascii=False))
        return
    for n, h in enumerate(hits, 1):
        text = " ".join(h.chunk.text.split())
        heading = f"  # {h.chunk.heading}" if h.chunk.heading else ""
        print(f"{n}. {h.chunk.where}  score {h.score:.4f}  similarity {h.similarity:.3f}{heading}\n"
              f"   {text[:200]}{'...' if len(text) > 200 else ''}")


def rag_ask(ns) -> None:
    a = from_namespace(RagAskArgs, ns)
    from ..rag.ask import ask, sources_block
    from ..rag.index import Index

    index = Index(a.index, device=a.device)
    generator = a.generator()
    stream = None if a.json else _print_piece
    result = ask(index, generator, a.question, a.k, a.mode, a.min_score, a.max_tokens, a.temperature, a.seed, stream)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    if result["refused"]:
        print(result["answer"])
        return
    print("\n\n" + sources_block(result))


def rag_eval(ns) -> None:
    a = from_namespace(RagEvalArgs, ns)
    if not a.qa:
        raise LMForgeError("--qa FILE.jsonl is required")
    from ..rag.evaluate import evaluate, read_qa
    from ..rag.index import Index

    qa = read_qa(a.qa)
    index = Index(a.index, device=a.device)
    if a.mode == "all":
        print(json.dumps({m: evaluate(index, qa, a.k, m) for m in MODES}))
    else:
        print(json.dumps(evaluate(index, qa, a.k, a.mode)))


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class AgentArgs(GeneratorArgs):
    """Solve a task with tools. A model tuned on tool calls calls them natively (OpenAI's tool_calls);
    others run a ReAct loop in text (Thought / Action / Action Input / Observation ... Final Answer).
    Only the tools named in --tools exist; tool results go back to the model fenced as data. There is
    no shell tool."""

    task: str = arg(None, "what to do", positional=True)
    tools: str = arg("calculator", "allowed tools, comma-separated: calculator, search:INDEX, read:DIR")
    max_steps: int = arg(8, "most model steps before giving up", ge=1)
    confirm: bool = arg(False, "ask before each tool call (answer y to run it)")
    log: str | None = arg(None, "write the transcript to this .jsonl file")
    tool_format: str = arg("auto", "native: OpenAI tool calls; react: the text loop; auto: native for a local "
                           "model tuned on tool calls (or whose chat template takes tools), react otherwise",
                           choices=["auto", "native", "react"])


def agent(ns) -> None:
    a = from_namespace(AgentArgs, ns)
    from ..agents.react import run_agent
    from ..agents.tools import make_tools
    from ..core.fileio import atomic_write

    tools = make_tools(a.tools, a.device)
    generator = a.generator()
    transcript: list[dict] = []

    def show(entry: dict) -> None:
        transcript.append(entry)
        if entry["event"] == "model":
            print(f"--- step {entry['step']}\n{entry['text'].strip()}", file=sys.stderr)
        elif "observation" in entry:
            print(f"Observation: {entry['observation'][:2000]}", file=sys.stderr)

    try:
        result = run_agent(generator, a.task, tools, a.max_steps, a.max_tokens, a.temperature, a.seed,
                           _ask_human if a.confirm else None, show, tool_format=a.tool_format)
    finally:
        if a.log:
            atomic_write(a.log, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in transcript))
    if result.answer is not None:
        print(result.answer)
        return
    gathered = [e["observation"] for e in transcript if e["event"] == "tool"]
    print(f"no Final Answer after {result.steps} steps; what the tools returned:")
    for i, obs in enumerate(gathered, 1):
        print(f"  {i}. {' '.join(obs.split())[:300]}")


def _ask_human(tool: str, value: str) -> bool:
    print(f"run {tool}({value[:200]!r})? [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")
