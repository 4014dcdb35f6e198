"""Evaluation tasks: loading them (JSONL, a small YAML, or a built-in name) and building their prompts.

A task is one of three kinds, chosen by its records' fields:

- multiple choice: `{"context": ..., "choices": [...], "answer": index}` (`question` may stand for
  `context`; `answer` may be the text of the right choice);
- generation: `{"prompt": ..., "target": ...}` (exact match and contains, greedy, with stop strings);
- perplexity: `{"text": ...}` (loss, perplexity, bits per byte: `lmforge evaluate`'s metrics).

Prompts follow lm-evaluation-harness, so that numbers compare: a few-shot example reads
`text + target_delimiter + target`, examples are joined with `fewshot_delimiter` ("\\n\\n") and
followed by it, then the document's own text. Examples come from the task's `train` file when it
has one, else from its other documents: one `random.Random(seed)` (default 1234, as the harness)
draws them for each document in turn, k + 1 at a time when the pool is the documents themselves,
and the document is dropped from its own draw.

A task YAML names a file and, optionally, its settings:

    test: qa.jsonl          # the scored documents
    train: qa_train.jsonl   # few-shot pool (optional)
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    stop: ["\\n"]            # generation: where an answer ends
    max_tokens: 32          # generation: the longest answer

Built-in tasks (`arithmetic`, `pydocs`, `spam`; `builtin` = all three) are generated
deterministically on the spot, so `lmforge eval MODEL --task builtin` needs no download.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import LMForgeError
from ..data.records import read_records
from .builtin import builtin_fields

KINDS = ("choice", "generate", "perplexity")
BUILTIN = ("arithmetic", "pydocs", "spam")
HARNESS_SEED = 1234  # lm-evaluation-harness's default few-shot seed
MAX_DOCS = 1_000_000  # a bound on what one task file may hold


@dataclass
class Task:
    """Documents of one kind, normalised: choice {context, choices, answer}; generate {prompt, target};
    perplexity: the file itself (`path`), scored as `lmforge evaluate` scores text."""

    name: str
    kind: str
    docs: list[dict] = field(default_factory=list)
    pool: list[dict] | None = None  # few-shot examples; None: the documents themselves (minus the one scored)
    path: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_tokens: int = 32

    def text(self, doc: dict) -> str:
        return doc["context"] if self.kind == "choice" else doc["prompt"]

    def target(self, doc: dict) -> str:
        return doc["choices"][doc["answer"]] if self.kind == "choice" else doc["target"]

    def contexts(self, shots: int, seed: int = HARNESS_SEED, limit: int | None = None) -> list[str]:
        """The full prompt of each of the first `limit` documents (all by default) with `shots`
        examples (see the module docstring); examples may come from any document but the one scored."""
        pool = self.docs if self.pool is None else self.pool
        available = len(pool) - (1 if self.pool is None else 0)
        if shots > available:
            raise LMForgeError(f"task {self.name}: --shots {shots} is more than the {available} examples its "
                               f"few-shot pool holds" + (" (the other documents)" if self.pool is None else ""))
        rng = random.Random(seed)
        out = []
        for doc in self.docs[:limit]:
            if shots == 0:
                out.append(self.text(doc))
                continue
            if self.pool is None:
                examples = [d for d in rng.sample(pool, shots + 1) if d != doc][:shots]
            else:
                examples = rng.sample(pool, shots)
            shown = self.fewshot_delimiter.join(self.text(d) + self.target_delimiter + self.target(d)
                                                for d in examples)
            out.append(shown + self.fewshot_delimiter + self.text(doc))
        return out


def kind_of(record: dict) -> str | None:
    if "choices" in record:
        return "choice"
    if "prompt" in record and ("target" in record or "answer" in record):
        return "generate"
    if "text" in record:
        return "perplexity"
    return None


def _normalise(kind: str, rec: dict, where: str) -> dict:
    if kind == "generate":
        prompt, target = rec["prompt"], rec.get("target", rec.get("answer"))
        if not isinstance(prompt, str) or not isinstance(target, (str, int, float)):
            raise LMForgeError(f"{where}: a generation record needs a string prompt and a target")
        return {"prompt": prompt, "target": str(target)}
    context = rec.get("context", rec.get("question"))
    choices, answer = rec.get("choices"), rec.get("answer", rec.get("gold"))
    if not isinstance(context, str):
        raise LMForgeError(f"{where}: a multiple-choice record needs a string 'context' (or 'question')")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise LMForgeError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise LMForgeError(f"{where}: 'answer' must be the index of the right choice (or its text)")
    if not 0 <= answer < len(choices):
        raise LMForgeError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
    return {"context": context, "choices": choices, "answer": answer}


def read_task_file(path: str | Path, kind: str | None = None) -> tuple[str, list[dict]]:
    """(kind, normalised documents) from a JSONL/JSON file; every record must be of one kind."""
    records = read_records(path)
    if len(records) > MAX_DOCS:
        raise LMForgeError(f"{path}: more than {MAX_DOCS:,} records")
    docs, kinds = [], {}
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        k = kind_of(rec) if isinstance(rec, dict) else None
        if k is None:
            raise LMForgeError(f"{where}: a task record needs 'choices' (multiple choice), 'prompt' and 'target' "
                               "(generation) or 'text' (perplexity)")
        kinds.setdefault(k, lineno)
        if len(kinds) > 1:
            (k1, l1), (k2, l2) = kinds.items()
            raise LMForgeError(f"{path} mixes kinds of task: line {l1} is {k1}, line {l2} is {k2} (one kind per file)")
        if k != "perplexity":
            docs.append(_normalise(k, rec, where))
    found = next(iter(kinds))
    if kind and kind != found:
        raise LMForgeError(f"{path} holds {found} records, not {kind} ones")
    return found, docs


def load_task(spec: str) -> list[Task]:
    """The task(s) that `--task SPEC` names: a built-in name, `builtin`, a .jsonl/.json file or a .yaml."""
    if spec in BUILTIN or spec == "builtin":
        return [Task(**builtin_fields(n)) for n in (BUILTIN if spec == "builtin" else (spec,))]
    path = Path(spec)
    if not path.exists():
        raise LMForgeError(f"--task {spec!r}: no such file, and not a built-in task ({', '.join(BUILTIN)}, builtin)")
    if path.suffix in (".yaml", ".yml"):
        return [_task_from_yaml(path)]
    kind, docs = read_task_file(path)
    return [Task(path.stem, kind, docs, path=str(path))]


def _task_from_yaml(path: Path) -> Task:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LMForgeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    known = {"name", "test", "train", "target_delimiter", "fewshot_delimiter", "stop", "max_tokens"}
    if not isinstance(spec, dict) or "test" not in spec:
        raise LMForgeError(f"{path}: a task YAML needs at least `test: FILE.jsonl`")
    unknown = sorted(set(spec) - known)
    if unknown:
        raise LMForgeError(f"{path}: unknown task keys {unknown} (known: {', '.join(sorted(known))})")
    test = path.parent / str(spec["test"])
    kind, docs = read_task_file(test)
    pool = read_task_file(path.parent / str(spec["train"]), kind)[1] if spec.get("train") else None
    stop = spec.get("stop", ["\n"])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise LMForgeError(f"{path}: `stop` must be a string or a list of non-empty strings")
    max_tokens = spec.get("max_tokens", 32)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise LMForgeError(f"{path}: `max_tokens` must be a positive integer")
    return Task(str(spec.get("name", path.stem)), kind, docs, pool, str(test),
                str(spec.get("target_delimiter", " ")), str(spec.get("fewshot_delimiter", "\n\n")), stop, max_tokens)
