"""Text sources: files, directories, JSONL, and the built-in `pydocs` corpus.

A corpus is a list of documents (strings). Downstream, documents are joined with the
end-of-text token, so the model learns where one text stops and the next begins.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write

BUILTIN = "pydocs"
TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts",
    ".java", ".go", ".rs", ".rb", ".sh", ".tex", ".html", ".htm", ".xml", ".css", ".json", ".toml",
    ".yaml", ".yml", ".cfg", ".ini", ".csv", ".tsv", ".sql", ".org", ".adoc", ".text",
}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclass
class Corpus:
    documents: list[str]
    sources: list[str] = field(default_factory=list)  # the paths (or "pydocs") it was read from
    files: int = 0  # text and JSONL files read (pydocs counts as none)

    def fingerprint(self) -> str:
        """A hash of the content: the cache key for tokenizers and encoded data built from it."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:  # computed once: the tokenizer and data caches both key on it
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(hashlib.sha256(doc.encode()).digest())
        return h.hexdigest()[:16]

    @cached_property
    def num_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.documents)

    def describe(self) -> str:
        """What was read, for the log: "3 files (pydocs): 1,204 documents, 1.85 MB"."""
        where = [f"{self.files:,} file{'s' if self.files != 1 else ''}"] if self.files else []
        where += [BUILTIN] if BUILTIN in self.sources else []
        return f"{' + '.join(where)}: {len(self.documents):,} documents, {self.num_bytes / 1e6:.2f} MB"


def read_text(path: Path) -> str | None:
    """A file's text, or None (with a warning) when it is binary."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        warn(f"skipping binary file {path}")
        return None
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        warn(f"{path}: {bad} invalid UTF-8 sequence(s) replaced with U+FFFD")
    return text


def read_jsonl(path: Path, text_field: str) -> list[tuple[int, str]]:
    """(line number, text) of each record of a JSONL file."""
    docs = []
    text = read_text(path)
    for lineno, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise LMForgeError(f"{path}:{lineno}: record has no {text_field!r} field")
        if not isinstance(record[text_field], str):
            raise LMForgeError(f"{path}:{lineno}: field {text_field!r} is not a string")
        docs.append((lineno, record[text_field]))
    return docs


def text_files(directory: Path) -> list[Path]:
    """Text files under a directory, recursively, in sorted order; hidden entries skipped, and the
    other files (images, PDFs, archives) skipped with one warning that counts them by suffix."""
    found, others = [], Counter()
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith("."):
                continue
            if p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES:
                found.append(p)
            else:
                others[p.suffix.lower() or "(no suffix)"] += 1
    if others:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in others.most_common())
        warn(f"skipped {sum(others.values())} file(s) under {directory} that are not text ({kinds}); the text "
             f"suffixes read are {', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))}")
    return found


def source_files(spec: str) -> list[Path]:
    """The files a command-line data argument names: a file, or the text files under a directory."""
    path = Path(spec)
    if not path.exists():
        raise LMForgeError(f"no such file or directory: {spec}")
    files = text_files(path) if path.is_dir() else [path]
    if path.is_dir() and not files:
        warn(f"no text files found under {spec}")
    return files


def load_corpus(paths: list[str], text_field: str = "text") -> Corpus:
    """Read documents from files, directories (recursive), JSONL files, or `pydocs`.

    A plain file is one document; each JSONL line is one document (its `text_field`).
    """
    if not paths:
        raise LMForgeError("no data given (pass files, directories, or 'pydocs')")
    docs: list[str] = []
    n_files = 0
    for spec in paths:
        if spec == BUILTIN:
            docs.extend(pydocs())
            continue
        files = source_files(spec)
        n_files += len(files)
        for f in files:
            if f.suffix.lower() in JSONL_SUFFIXES:
                docs.extend(text for _, text in read_jsonl(f, text_field))
            else:
                text = read_text(f)
                if text is not None:
                    docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LMForgeError(f"the corpus is empty: no text found in {', '.join(paths)}")
    return Corpus(docs, list(paths), n_files)


# --- The built-in corpus: documentation that ships with Python itself ---------------------------

# Modules whose import has side effects (opening a browser, printing, starting a GUI) or that
# are tests and tooling rather than documentation.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
         "test", "pydoc_data", "xxsubtype", "xxlimited", "xxlimited_35", "msilib", "winsound", "winreg",
         "msvcrt", "nt", "_winapi", "venv"}
_MIN_DOC_CHARS = 40  # shorter docstrings ("Return self==value.") are mostly boilerplate


def _collect_pydocs() -> list[str]:  # runs in a child process: imports have side effects
    import contextlib
    import importlib
    import inspect
    import io
    import pkgutil
    import pydoc_data.topics
    import warnings

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(pydoc_data.topics.topics.items())]
    seen: set[str] = set()

    def add(title: str, obj) -> None:
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < _MIN_DOC_CHARS or doc in seen:
            return
        seen.add(doc)
        docs.append(f"{title}\n\n{doc}")

    class _Shown:  # a default value rendered as given text
        def __init__(self, text: str) -> None:
            self.text = text

        def __repr__(self) -> str:
            return self.text

    def shown(value) -> _Shown:
        """Simple literal defaults as written; anything else (objects with memory addresses, the
        environment, paths of this machine) as `...`, so the corpus is the same everywhere."""
        simple = value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, (str, bytes)) and len(value) <= 40 and "/" not in str(value)
            and "\\" not in str(value))
        return _Shown(repr(value) if simple else "...")

    def signature(obj) -> str:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return ""
        params = [p.replace(default=shown(p.default), annotation=inspect.Parameter.empty)
                  if p.default is not inspect.Parameter.empty else p.replace(annotation=inspect.Parameter.empty)
                  for p in sig.parameters.values()]
        return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP)
    modules = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - a module that won't import is simply left out
                continue
            modules.append(mod)
            for info in sorted(pkgutil.iter_modules(getattr(mod, "__path__", [])), key=lambda i: i.name):
                if info.name.startswith("_") or info.name in _SKIP or "test" in info.name:
                    continue
                try:
                    modules.append(importlib.import_module(f"{name}.{info.name}"))
                except BaseException:  # noqa: BLE001
                    continue
    for mod in modules:
        add(f"Module {mod.__name__}", mod)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            qual = f"{mod.__name__}.{attr}"
            if inspect.isclass(obj):
                add(f"class {qual}{signature(obj)}", obj)
                for m_name, member in sorted(vars(obj).items()):
                    if not m_name.startswith("_") and callable(member):
                        add(f"{qual}.{m_name}{signature(member)}", member)
            elif callable(obj):
                add(f"{qual}{signature(obj)}", obj)
    return docs


def _cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def pydocs() -> list[str]:
    """The `pydocs` corpus: Python's topic help plus standard-library docstrings (~2 MB).

    Assembled from the running Python, with no download; deterministic, deduplicated, cached.
    """
    key = hashlib.sha256(f"{sys.version}|{sys.executable}|v2".encode()).hexdigest()[:12]
    cache = _cache_dir() / "corpus" / f"pydocs-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    print("building the pydocs corpus from this Python's documentation ...", file=sys.stderr)
    code = "import json, sys; from lmforge.text.corpus import _collect_pydocs; json.dump(_collect_pydocs(), sys.stdout)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise LMForgeError(f"could not build the pydocs corpus: {out.stderr.strip().splitlines()[-1:]}")
    docs = json.loads(out.stdout)
    atomic_write(cache, json.dumps(docs))
    return docs
