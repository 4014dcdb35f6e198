"""Records from files: one JSONL reader behind labelled rows (classification), input/target pairs
(sequence to sequence) and instruction or chat conversations (instruction tuning). Every error
names the file and line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..core.errors import LMForgeError
from ..text.templates import validate_messages
from ..text.toolcalls import parse_tools


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL file or a JSON array."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}: invalid JSON ({e.msg})") from None
        return [(i + 1, r) for i, r in enumerate(data)]
    records = []
    # JSON Lines ends records at \n alone: str.splitlines would also split at U+2028 and other
    # separators a JSON string may hold raw
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not records:
        raise LMForgeError(f"{path} holds no records")
    return records


def read_rows(path: str | Path, fields: list[str | None], flags: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from CSV/TSV (header row) or JSON lines, after checking that every
    named field is a column (or, in JSON, a key of some record); `flags` names the options that
    choose other columns, for the error."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"no such file: {path}")
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        text = path.read_text(encoding="utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text), delimiter="," if path.suffix.lower() == ".csv" else "\t")
        rows = [(i + 2, r) for i, r in enumerate(reader)]
        columns = reader.fieldnames or []
    else:
        rows = read_records(path)
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    for field in fields:
        if field is not None and field not in columns:
            raise LMForgeError(f"{path}: no column {field!r} (columns: {', '.join(columns) or 'none'}); set {flags}")
    return rows


def read_labelled(path: str | Path, text_field: str, label_field: str | None) -> tuple[list[str], list[str]]:
    """(texts, labels) from CSV/TSV (header row) or JSON lines; labels become strings (label_field
    None: texts only)."""
    path = Path(path)
    rows = read_rows(path, [text_field, label_field], "--text-field / --label-field")
    texts, labels, empty = [], [], []
    for where, r in rows:
        if not isinstance(r, dict) or (label_field is not None and r.get(label_field) in (None, "")):
            raise LMForgeError(f"{path}:{where}: row has no {label_field!r}")
        t = r.get(text_field)
        if not isinstance(t, str) or not t.strip():
            empty.append(where)
            continue
        texts.append(t)
        labels.append(str(r[label_field]) if label_field is not None else "")
    if empty:
        raise LMForgeError(f"{path}: {len(empty)} row(s) with empty text (first at line {empty[0]})")
    if not texts:
        raise LMForgeError(f"{path} holds no rows")
    return texts, labels


def read_pairs(path: str | Path, input_field: str = "input",
               target_field: str = "target") -> tuple[list[str], list[str]]:
    """(inputs, targets) for sequence-to-sequence training: JSON lines {"input": ..., "target": ...}
    or CSV/TSV with those columns (other names through `input_field` / `target_field`). Both must be
    non-empty strings in every row: a silently skipped row would shift what a user evaluates."""
    rows = read_rows(path, [input_field, target_field], "--input-column / --target-column")
    inputs, targets = [], []
    for where, r in rows:
        if not isinstance(r, dict):
            raise LMForgeError(f"{path}:{where}: expected a JSON object")
        for field, out in ((input_field, inputs), (target_field, targets)):
            value = r.get(field)
            if not isinstance(value, str) or not value.strip():
                raise LMForgeError(f"{path}:{where}: {field!r} must be a non-empty string"
                                   f"{'' if field in r else ' (missing)'}")
            out.append(value)
    return inputs, targets


def read_instructions(path: str | Path) -> list[list[dict]]:
    """Conversations (lists of messages) from Alpaca- or chat-style records. A chat record may hold
    OpenAI-format `tools`, assistant `tool_calls` and `tool` messages; its tools ride on its first
    message (key "tools"), where `Template.render` finds them."""
    out = []
    for lineno, r in read_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(r, dict):
            raise LMForgeError(f"{where}: expected a JSON object")
        if "messages" in r:
            messages = validate_messages(r["messages"], where)
            if not any(m["role"] == "assistant" for m in messages):
                raise LMForgeError(f"{where}: the conversation has no assistant message to learn from")
            if r.get("tools"):  # OpenAI-format tool use: the conversation carries the tools it offered
                messages[0]["tools"] = [t.to_json() for t in parse_tools(r["tools"], f"{where}: tools")]
        elif "instruction" in r:
            if "output" not in r:
                raise LMForgeError(f"{where}: record has no 'output'")
            if not isinstance(r["output"], str) or not isinstance(r["instruction"], str):
                raise LMForgeError(f"{where}: 'instruction' and 'output' must be strings")
            messages = [{"role": "user", "content": r["instruction"], "input": r.get("input") or ""},
                        {"role": "assistant", "content": r["output"]}]
        else:
            raise LMForgeError(f"{where}: record has neither 'messages' nor 'instruction'")
        out.append(messages)
    return out


def looks_like_instructions(path: str | Path) -> bool:
    """Whether a data file holds instruction records rather than plain text."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return False
    try:
        first = read_records(path)[0][1]
    except LMForgeError:
        return False
    return isinstance(first, dict) and ("instruction" in first or "messages" in first)



def read_texts(texts: list[str], file: str | Path | None, text_field: str = "text", what: str = "embed") -> list[str]:
    """Texts given directly plus those of `file`: the text column of a .csv/.tsv/.jsonl, else each
    non-empty line."""
    texts = list(texts)
    if file:
        path = Path(file)
        if not path.exists():
            raise LMForgeError(f"no such file: {path}")
        if path.suffix.lower() in (".csv", ".tsv", ".tab", ".jsonl", ".json"):
            texts += read_labelled(path, text_field, None)[0]
        else:
            texts += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip()]
    if not texts:
        raise LMForgeError(f"nothing to {what}: {file} has no non-blank lines" if file
                           else f"nothing to {what}: give --text or --file")
    return texts
