"""A retrieval index on disk: chunks, their dense vectors (FAISS) and a BM25 index (bm25s).

    INDEX/
      manifest.json   encoder (name, fingerprint, width), chunking settings, counts, per-file hashes
      chunks.jsonl    one chunk per line: path, start_line, end_line, heading, text
      vectors.npy     [chunks, width] float32, unit rows (row i is chunk i)
      dense.faiss     inner-product index over the vectors: exact (flat) up to EXACT_MAX, HNSW above
      bm25/           bm25s's files

Building is incremental: files whose content hash is unchanged keep their chunks and vectors, new
or changed files are chunked and embedded, files no longer given are dropped. The new index is
written beside the old one and swapped in, so an index is never half-written.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write, atomic_write_json, recover_dir, replace_dir
from .chunking import Chunk, chunk_document, content_hash, read_sources

FORMAT = "lmforge-rag-index"
VERSION = 1
EXACT_MAX = 50_000  # chunks: a flat index answers exactly and fast enough below this; HNSW above
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.): dampens the weight of the top ranks
MODES = ("hybrid", "rrf", "dense", "bm25")
# The hybrid's (dense, bm25) fusion weights, by kind of query (see Index.hybrid_weights).
LOOKUP_WEIGHTS = (0.01, 1.0)  # one chunk holds every query word: BM25 leads, the encoder breaks ties
QUESTION_WEIGHTS = (1.0, 0.25)  # otherwise: the encoder leads, BM25 reorders its candidates
_WORD = re.compile(r"[a-z0-9]+")


def rrf(rankings: list[list[tuple[int, float]]], weights: list[float] | None = None,
        k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: each item scores sum(weight / (k + rank)) over the rankings that
    hold it (rank 1 = first); best first, ties by item id."""
    fused: dict[int, float] = {}
    for weight, ranking in zip(weights or [1.0] * len(rankings), rankings):
        for r, (i, _) in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0.0) + weight / (k + r)
    return sorted(fused.items(), key=lambda t: (-t[1], t[0]))


class Encoder:
    """A sentence encoder for retrieval: `name` as the user gave it (minilm or a directory), a
    fingerprint of its files (so an index is only ever queried with the encoder that built it)."""

    def __init__(self, name: str, device: str = "auto") -> None:
        from ..formats.load import builtin_model, load_model
        from ..inference.embed import require_encoder

        self.name = name
        self.dir = builtin_model(name) or Path(name).expanduser()
        if not self.dir.is_dir():
            raise LMForgeError(f"encoder {name!r} is neither 'minilm' nor a model directory")
        self.lm = load_model(name, device)
        require_encoder(self.lm, "rag")
        self.fingerprint = fingerprint(self.dir)
        self.dim = int(self.lm.model.cfg.n_embd)

    def count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.lm.tokenizer.encode_batch(texts)] if texts else []

    def embed(self, texts: list[str]) -> np.ndarray:
        from ..inference.embed import embed_texts

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return embed_texts(self.lm, texts)

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim}


def fingerprint(model_dir: Path) -> str:
    """A hash of a model directory's config, tokenizer and weights (sizes and first megabyte)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.name in ("config.json", "tokenizer.json", "vocab.txt"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            with open(f, "rb") as fh:
                h.update(f"{f.name}:{f.stat().st_size}".encode() + fh.read(1 << 20))
    return h.hexdigest()[:16]


def bm25_tokens(text: str) -> list[str]:
    """Lower-case words and numbers; identifiers split at . and _ (json.dumps -> json, dumps)."""
    from bm25s.stopwords import STOPWORDS_EN

    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS_EN]


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the ranking score of the mode (RRF, cosine, or BM25)
    similarity: float  # cosine similarity to the query, whatever the mode (what --min-score checks)
    n: int = 0  # chunk number in the index

    def to_dict(self) -> dict:
        return {**self.chunk.to_dict(), "score": round(self.score, 6), "similarity": round(self.similarity, 6)}


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    recover_dir(path, "manifest.json")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        raise LMForgeError(f"{path} is not a retrieval index (no readable manifest.json; build one with "
                           "`lmforge rag index`)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LMForgeError(f"{path} is not a retrieval index (its manifest.json is something else)")
    if manifest.get("version") != VERSION:
        raise LMForgeError(f"{path}: index format version {manifest.get('version')} (this lmforge reads {VERSION})")
    return manifest


def build_index(sources: list[str], out: str | Path, encoder: Encoder, size: int = 200, overlap: int = 32,
                text_field: str = "text", rebuild: bool = False) -> dict:
    """Create or update the index at `out`; returns what changed:
    {"files", "chunks", "embedded_files": [...], "unchanged_files": n, "removed_files": [...]}."""
    out = Path(out)
    docs = read_sources(sources, text_field)
    skip = [out.resolve(), out.with_name(out.name + ".new").resolve()]  # an index inside its own docs
    docs = {p: d for p, d in docs.items() if not any(s == Path(p).resolve() or s in Path(p).resolve().parents
                                                     for s in skip)}
    if not docs:
        raise LMForgeError(f"no documents to index in {', '.join(sources)}")
    chunking = {"size": size, "overlap": overlap}
    old_chunks: dict[str, list[tuple[Chunk, np.ndarray]]] = {}
    old_files: dict = {}
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)  # never replace a directory that is not an index
        if manifest["encoder"]["fingerprint"] != encoder.fingerprint and not rebuild:
            raise LMForgeError(f"{out} was built with encoder {manifest['encoder']['name']!r}, not "
                               f"{encoder.name!r} (pass --rebuild to re-embed everything)")
        if manifest["chunking"] == chunking and not rebuild:
            old_files, old_chunks = manifest["files"], _old_chunks(out)

    chunks: list[Chunk] = []
    vectors: list[np.ndarray] = []
    files, embedded = {}, []
    pending: list[Chunk] = []
    for path, path_docs in docs.items():
        digest = content_hash(path_docs)
        if old_files.get(path, {}).get("sha256") == digest and path in old_chunks:
            kept = old_chunks[path]
            chunks.extend(c for c, _ in kept)
            vectors.extend(v for _, v in kept)
        else:
            new = [c for d in path_docs for c in chunk_document(d, encoder.count, size, overlap)]
            embedded.append(path)
            pending.extend(new)
            chunks.extend(new)
            vectors.extend([None] * len(new))
        files[path] = {"sha256": digest}
    if pending:
        print(f"embedding {len(pending):,} chunks from {len(embedded):,} files ...", file=sys.stderr)
        fresh = iter(encoder.embed([c.embed_text() for c in pending]))
        vectors = [v if v is not None else next(fresh) for v in vectors]
    for c in chunks:
        files[c.path]["chunks"] = files[c.path].get("chunks", 0) + 1
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, encoder.dim), np.float32)
    removed = sorted(set(old_files) - set(files))
    manifest = {"format": FORMAT, "version": VERSION, "encoder": encoder.describe(), "chunking": chunking,
                "vector_index": "flat" if len(chunks) <= EXACT_MAX else "hnsw",
                "counts": {"files": len(files), "chunks": len(chunks)}, "sources": list(sources), "files": files}
    _write(out, manifest, chunks, matrix)
    return {"files": len(files), "chunks": len(chunks), "embedded_files": embedded,
            "unchanged_files": len(files) - len(embedded), "removed_files": removed}


def _old_chunks(path: Path) -> dict[str, list[tuple[Chunk, np.ndarray]]]:
    chunks = _read_chunks(path)
    vectors = np.load(path / "vectors.npy")
    out: dict[str, list[tuple[Chunk, np.ndarray]]] = {}
    for c, v in zip(chunks, vectors):
        out.setdefault(c.path, []).append((c, v))
    return out


def _read_chunks(path: Path) -> list[Chunk]:
    with open(path / "chunks.jsonl", encoding="utf-8") as f:
        return [Chunk(**json.loads(line)) for line in f if line.strip()]


def _write(out: Path, manifest: dict, chunks: list[Chunk], vectors: np.ndarray) -> None:
    """Write the whole index beside `out` (OUT.new), manifest last, then swap it in."""
    import shutil

    import bm25s
    import faiss

    new = out.with_name(out.name + ".new")
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    atomic_write(new / "chunks.jsonl", "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in chunks))
    with open(new / "vectors.npy", "wb") as f:
        np.save(f, vectors)
    faiss.write_index(_dense_index(vectors, manifest["vector_index"]), str(new / "dense.faiss"))
    bm25 = bm25s.BM25()
    bm25.index([bm25_tokens(c.embed_text()) for c in chunks] or [[]], show_progress=False)
    bm25.save(str(new / "bm25"), show_progress=False)
    atomic_write_json(new / "manifest.json", manifest)
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    replace_dir(new, out)


def _dense_index(vectors: np.ndarray, kind: str):
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    if len(vectors):
        index.add(np.ascontiguousarray(vectors))
    return index


class Index:
    """An index opened for search. Its encoder is the one named in the manifest, and it must
    still be the same model (same fingerprint); `encoder` may be given to share a loaded one."""

    def __init__(self, path: str | Path, encoder: Encoder | str | None = None, device: str = "auto") -> None:
        import bm25s
        import faiss

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        built = self.manifest["encoder"]
        if isinstance(encoder, str):
            encoder = Encoder(encoder, device)
        self.encoder = encoder or Encoder(built["name"], device)
        if self.encoder.fingerprint != built["fingerprint"]:
            raise LMForgeError(f"{self.path} was built with encoder {built['name']!r} (fingerprint "
                               f"{built['fingerprint']}); {self.encoder.name!r} is a different model "
                               f"({self.encoder.fingerprint}): query it with the encoder that built it")
        self.chunks = _read_chunks(self.path)
        self.vectors = np.load(self.path / "vectors.npy")
        self.dense = faiss.read_index(str(self.path / "dense.faiss"))
        if hasattr(self.dense, "hnsw"):
            self.dense.hnsw.efSearch = 128
        self.bm25 = bm25s.BM25.load(str(self.path / "bm25"), show_progress=False)

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise LMForgeError(f"unknown search mode {mode!r} (choose from {', '.join(MODES)})")
        if not query.strip():
            raise LMForgeError("the query is empty")
        if not self.chunks:
            return []
        q = self.encoder.embed([query])[0]
        return self.search_vector(query, q, k, mode)

    def search_vector(self, query: str, q: np.ndarray, k: int, mode: str) -> list[Hit]:
        """Search with an already embedded query (benchmarks embed all queries in one batch)."""
        depth = min(len(self.chunks), max(k * 10, 50))  # candidates each side hands to the fusion
        dense = self._dense(q, depth) if mode != "bm25" else []
        sparse = self._bm25(query, depth) if mode != "dense" else []
        if mode == "dense":
            ranked = dense
        elif mode == "bm25":
            ranked = sparse
        elif mode == "rrf":
            ranked = rrf([dense, sparse])
        else:
            ranked = rrf([dense, sparse], list(self.hybrid_weights(query, sparse)))
        return [Hit(self.chunks[i], float(s), float(self.vectors[i] @ q), i) for i, s in ranked[:k]]

    def hybrid_weights(self, query: str, sparse: list[tuple[int, float]]) -> tuple[float, float]:
        """The (dense, bm25) weights of the hybrid's reciprocal-rank fusion, by one rule:

        - A lookup: some chunk holds every word of the query (BM25's best chunk covers it all: a
          name, an error message, a phrase copied from the docs). BM25 leads; the encoder only
          breaks its ties and ranks what BM25 left out (LOOKUP_WEIGHTS, 0.01 : 1).
        - A question in the reader's own words (no chunk holds them all). The encoder leads and
          BM25 counts a quarter (QUESTION_WEIGHTS, 1 : 0.25), which makes BM25 a reranker of the
          encoder's candidates: BM25's first pick gains 0.25/61, enough to climb about twenty of
          the encoder's places, while a chunk that only BM25 found scores below any of the
          encoder's first 180. Plain RRF (equal weights, mode "rrf") instead ranks every chunk
          the two lists share above every chunk only one holds (at 50 candidates a side), so
          chunks that merely share a few common words with the question crowd out the
          encoder's best answer.

        Chosen on benchmarks/rag_retrieval.py (two corpora, three query sets; the results are
        in docs/rag.md); the rule has two settings and neither was fitted finely: any BM25
        share from 0.15 to 0.3 scores within 0.015 MRR of 0.25 on every set.
        """
        if sparse and self._coverage(query, sparse[0][0]) >= 1.0:
            return LOOKUP_WEIGHTS
        return QUESTION_WEIGHTS

    def _coverage(self, query: str, best: int) -> float:
        """The share of the query's distinct words that chunk `best` contains (0 to 1)."""
        words = set(bm25_tokens(query))
        return len(words & set(bm25_tokens(self.chunks[best].embed_text()))) / len(words) if words else 0.0

    def _dense(self, q: np.ndarray, depth: int) -> list[tuple[int, float]]:
        scores, ids = self.dense.search(q[None].astype(np.float32), depth)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _bm25(self, query: str, depth: int) -> list[tuple[int, float]]:
        tokens = bm25_tokens(query)
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens)
        top = np.argsort(-scores, kind="stable")[:depth]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]  # no shared word: no evidence
