"""The verbs `eval`, `judge` and `scaling sweep|fit|predict`: their flags and their functions.

Torch-free at import (the libraries are imported inside the functions), so `--help` answers at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from ..core.errors import LMForgeError
from .args import DEVICE_HELP


@dataclass
class EvalArgs:
    """Score a model on tasks, lm-evaluation-harness style: multiple choice by log-likelihood (acc,
    acc_norm), generation by greedy answers (exact_match, contains), perplexity on text. A task is
    a JSONL file ({context, choices, answer} | {prompt, target} | {text}), a task YAML (test/train
    files and settings, see `lmforge.eval.tasks`), or a built-in: arithmetic, pydocs, spam, or
    builtin for all three. Prints a table, or with --json one JSON object (per task and aggregate,
    with standard errors)."""

    model_dir: str | None = arg(None, "model directory or Hugging Face checkpoint (or use --api)", positional=True)
    task: list[str] = arg(["builtin"], "tasks: .jsonl / .yaml files or built-in names (arithmetic, pydocs, spam, "
                          "builtin)")
    shots: int = arg(0, "few-shot examples before each document (drawn with --seed, never the document itself)",
                     ge=0)
    seed: int = arg(1234, "few-shot sampling seed (1234, as lm-evaluation-harness)")
    limit: int | None = arg(None, "score only the first N documents of each task", ge=1)
    batch_size: int = arg(16, "sequences per forward pass (multiple choice) or answers in flight (generation)",
                          ge=1)
    json: bool = arg(False, "print one JSON object instead of a table")
    samples: str | None = arg(None, "write every scored document (prompt, choices/answer, scores) to this JSONL")
    api: str | None = arg(None, "evaluate an OpenAI-compatible server instead (generation tasks only), e.g. "
                          "http://127.0.0.1:8000/v1")
    api_model: str | None = arg(None, "model name to ask the server for (default: its first)")
    api_key: str | None = arg(None, "bearer token for the server")
    device: str = arg("auto", DEVICE_HELP)


def eval_(ns) -> None:
    if getattr(ns, "api", None) and not getattr(ns, "model_dir", None):
        ns.model_dir = ns.api  # `eval --api URL`: the server stands in for the model directory
    a = from_namespace(EvalArgs, ns)
    from ..core.fileio import atomic_write
    from ..eval.harness import aggregate, run_task
    from ..eval.tasks import load_task

    if a.api and a.model_dir != a.api:
        raise LMForgeError("give a model directory or --api URL, not both")
    tasks = [t for spec in a.task for t in load_task(spec)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise LMForgeError(f"two tasks share a name: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    for t in tasks:  # refuse before loading anything
        t.contexts(a.shots, a.seed, 0) if t.kind != "perplexity" else None
    lm = generator = None
    if a.api:
        from ..inference.client import RemoteGenerator

        generator = RemoteGenerator(a.api, a.api_model, a.api_key)
    else:
        from ..formats.load import load_model

        lm = load_model(a.model_dir, device=a.device)
    results, samples = {}, []
    for t in tasks:
        print(f"{t.name}: {t.kind}, {min(len(t.docs), a.limit or len(t.docs)) or 'text'} documents ...",
              file=sys.stderr)
        results[t.name], rows = run_task(t, lm, generator, a.shots, a.seed, a.limit, a.batch_size)
        samples += [{"task": t.name, **r} for r in rows]
    out = {"model": a.api or a.model_dir, "results": results, "aggregate": aggregate(results),
           "config": {"shots": a.shots, "seed": a.seed, "limit": a.limit}}
    if a.samples:
        atomic_write(a.samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(format_table(out))


def format_table(out: dict) -> str:
    lines = [f"{'task':<16} {'kind':<10} {'n':>5}  metric          value   stderr"]
    for name, r in out["results"].items():
        metrics = [k for k in ("acc", "acc_norm", "exact_match", "contains", "loss", "perplexity", "bits_per_byte")
                   if k in r]
        for i, k in enumerate(metrics):
            se = r.get(f"{k}_stderr")
            head = f"{name:<16} {r['kind']:<10} {r.get('examples', ''):>5}" if i == 0 else " " * 33
            lines.append(f"{head}  {k:<14} {r[k]:>7.4f}  {'' if se is None else f'{se:.4f}'}")
    agg = out["aggregate"]
    if agg:
        se = agg["score_stderr"]
        lines.append(f"{'aggregate':<16} {'':<10} {agg['examples']:>5}  {'score':<14} {agg['score']:>7.4f}  "
                     f"{'' if se is None else f'{se:.4f}'}")
    return "\n".join(lines)
