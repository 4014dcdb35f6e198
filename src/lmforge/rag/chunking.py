"""Documents -> chunks: split on headings and paragraphs, packed to a target size in tokens.

Every chunk knows where it came from (`path`, `start_line`, `end_line`, 1-based and inclusive)
and the nearest heading above it, so an answer can cite `path:start-end` and a reader can check it.
Chunks never cross a heading; consecutive chunks of one section share about `overlap` tokens.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import LMForgeError
from ..text.corpus import BUILTIN, JSONL_SUFFIXES, pydocs, read_jsonl, read_text, source_files

CountTokens = Callable[[list[str]], list[int]]  # token count of each text
CODE_SUFFIXES = {".py", ".pyi"}  # top-level def/class lines act as headings
RST_RULE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")
MD_HEADING = re.compile(r"^#{1,6}\s+(\S.*?)\s*#*\s*$")
PY_HEADING = re.compile(r"^(?:async\s+def|def|class)\s+\w+")


@dataclass
class Document:
    """One text to chunk. `line` pins every chunk to one line of the file (a JSONL record);
    `title` is the heading of text that comes before any heading of its own."""

    path: str
    text: str
    line: int | None = None
    title: str = ""


@dataclass
class Chunk:
    path: str
    start_line: int
    end_line: int
    heading: str
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def embed_text(self) -> str:
        """What the encoder and BM25 read: the heading gives a paragraph its context."""
        return self.text if not self.heading or self.text.startswith(self.heading) else f"{self.heading}\n{self.text}"


@dataclass
class _Unit:  # a paragraph, a line, or a piece of an overlong line
    start: int  # 0-based line indices, inclusive
    end: int
    tokens: int
    text: str | None = None  # only for a piece of a line (otherwise the lines themselves)


def read_sources(paths: list[str], text_field: str = "text") -> dict[str, list[Document]]:
    """{path: its documents} for files, directories (recursive), JSONL files (one document per
    record) and `pydocs` (one "file" per entry, named pydocs:NAME)."""
    if not paths:
        raise LMForgeError("no documents given (pass files, directories, or 'pydocs')")
    out: dict[str, list[Document]] = {}
    for spec in paths:
        if spec == BUILTIN:
            out.update(_pydocs_documents())
            continue
        for f in source_files(spec):
            if f.suffix.lower() in JSONL_SUFFIXES:
                out[str(f)] = [Document(str(f), text, line=n) for n, text in read_jsonl(f, text_field) if text.strip()]
            elif (text := read_text(f)) is not None and text.strip():
                out[str(f)] = [Document(str(f), text)]
    out = {p: docs for p, docs in out.items() if docs}
    if not out:
        raise LMForgeError(f"no text found in {', '.join(paths)}")
    return out


def _pydocs_documents() -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {}
    for text in pydocs():
        title = text.split("\n", 1)[0]
        name = re.sub(r"^(class|Module)\s+", "", title).split("(", 1)[0].strip() or "entry"
        path, n = f"{BUILTIN}:{name}", 2
        while path in out:  # the same name documented twice (a topic and a module, say)
            path, n = f"{BUILTIN}:{name}#{n}", n + 1
        out[path] = [Document(path, text, title=title)]
    return out


def content_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.line}\0{len(d.text)}\0".encode())
        h.update(d.text.encode())
    return h.hexdigest()


def headings(lines: list[str], path: str) -> dict[int, tuple[str, int]]:
    """{line index: (heading text, how many lines the heading takes)} for Markdown (# ...),
    reStructuredText (a title underlined, optionally overlined, with = - ~ ...) and Python
    (top-level def/class). Lines inside ``` fences are never headings."""
    suffix = Path(path).suffix.lower()
    found: dict[int, tuple[str, int]] = {}
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            if suffix in CODE_SUFFIXES:
                if PY_HEADING.match(line):
                    found[i] = (line.rstrip().rstrip(":"), 1)
            elif (m := MD_HEADING.match(line)) and suffix not in (".rst", ".txt", ".text"):
                found[i] = (m.group(1), 1)
            elif line.strip() and not RST_RULE.match(line) and i + 1 < len(lines) \
                    and RST_RULE.match(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(line.rstrip()):
                over = i > 0 and RST_RULE.match(lines[i - 1]) is not None and (i - 1) not in _covered(found)
                start = i - 1 if over else i
                found.pop(start, None)
                found[start] = (line.strip(), 3 if over else 2)
                i += 2
                continue
        i += 1
    return found


def _covered(found: dict[int, tuple[str, int]]) -> set[int]:
    return {i + k for i, (_, n) in found.items() for k in range(n)}


def chunk_document(doc: Document, count: CountTokens, size: int = 200, overlap: int = 32) -> list[Chunk]:
    """Split one document into chunks of at most about `size` tokens (a single word can exceed it)."""
    if size < 8 or not 0 <= overlap < size // 2:
        raise LMForgeError(f"chunk size {size} / overlap {overlap}: need size >= 8 and 0 <= overlap < size/2")
    lines = doc.text.splitlines()
    counts = count(lines)
    heads = headings(lines, doc.path)
    chunks: list[Chunk] = []
    starts = sorted(set(heads) | {0})
    for s, start in enumerate(starts):
        end = starts[s + 1] if s + 1 < len(starts) else len(lines)
        heading = heads[start][0] if start in heads else doc.title
        units = _units(lines, counts, start, end, size, count)
        for group in _pack(units, size, overlap):
            chunks.append(_make_chunk(doc, lines, group, heading))
    return chunks


def _units(lines: list[str], counts: list[int], start: int, end: int, size: int, count: CountTokens) -> list[_Unit]:
    """Paragraphs of lines[start:end]; a paragraph over `size` becomes its lines, a line over
    `size` becomes pieces of whole words."""
    units: list[_Unit] = []
    i = start
    while i < end:
        if not lines[i].strip():
            i += 1
            continue
        j = i
        while j < end and lines[j].strip():
            j += 1
        total = sum(counts[i:j])
        if total <= size:
            units.append(_Unit(i, j - 1, total))
        else:
            for k in range(i, j):
                if counts[k] <= size:
                    units.append(_Unit(k, k, counts[k]))
                else:
                    units.extend(_line_pieces(lines[k], k, size, count))
        i = j
    return units


def _line_pieces(line: str, index: int, size: int, count: CountTokens) -> list[_Unit]:
    words = line.split()
    per_word = count(words)
    pieces, cur, cur_tokens = [], [], 0
    for w, n in zip(words, per_word):
        if cur and cur_tokens + n > size:
            pieces.append(_Unit(index, index, cur_tokens, " ".join(cur)))
            cur, cur_tokens = [], 0
        cur.append(w)
        cur_tokens += n
    if cur:
        pieces.append(_Unit(index, index, cur_tokens, " ".join(cur)))
    return pieces


def _pack(units: list[_Unit], size: int, overlap: int) -> list[list[_Unit]]:
    """Greedy packing; each new chunk starts with the last units of the previous one that fit in
    `overlap` tokens (never all of them, so every chunk adds something)."""
    groups: list[list[_Unit]] = []
    cur: list[_Unit] = []
    for u in units:
        if cur and sum(x.tokens for x in cur) + u.tokens > size:
            groups.append(cur)
            tail: list[_Unit] = []
            for x in reversed(cur[1:]):
                if sum(t.tokens for t in tail) + x.tokens > overlap:
                    break
                tail.insert(0, x)
            cur = tail if sum(t.tokens for t in tail) + u.tokens <= size else []
        cur.append(u)
    if cur:
        groups.append(cur)
    return groups


def _make_chunk(doc: Document, lines: list[str], group: list[_Unit], heading: str) -> Chunk:
    if all(u.text is None for u in group):
        text = "\n".join(lines[group[0].start:group[-1].end + 1])
    else:
        text = "\n".join(u.text if u.text is not None else "\n".join(lines[u.start:u.end + 1]) for u in group)
    if doc.line is not None:
        return Chunk(doc.path, doc.line, doc.line, heading, text)
    return Chunk(doc.path, group[0].start + 1, group[-1].end + 1, heading, text)
