"""The verbs `eval`, `judge` and `scaling sweep|fit|predict`: their flags and their functions.

Torch-free at import (the libraries are imported inside the functions), so `--help` answers at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from ..core.errors import LMForgeError
from .args import device_flag, quantize_flag


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
    device: str = device_flag()
    quantize: str = quantize_flag()


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

        lm = load_model(a.model_dir, device=a.device, quantize=a.quantize)
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


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LMForgeError(f"{what} must be comma-separated numbers (e.g. 1e12,3e12), got {text!r}") from None
    if not values or min(values) <= 0:
        raise LMForgeError(f"{what} must be positive numbers")
    return values


@dataclass
class ScalingSweepArgs:
    """Run an IsoFLOP grid of pretraining runs: for every compute budget (--flops) and every size
    (--sizes), a run that trains on the tokens the budget allows. N counts every weight but the input
    embedding lookup; D = C / (the model's exact training FLOPs per token). Resumable: run it again
    to skip finished runs and resume a killed one; then `lmforge scaling fit SWEEP`."""

    data: list[str] = arg(["pydocs"], "training text: files, directories, .jsonl, or pydocs")
    sizes: str = arg("d1,d2,d3,d4", "model sizes, comma-separated: dN (N layers of width 64*N) or LxW (L layers of "
                     "width W, e.g. 1x32)")
    flops: str = arg("2e11,6e11,2e12", "compute budgets in training FLOPs, comma-separated")
    out: str = arg(None, "sweep directory (plan, runs, results)")
    jobs: int = arg(1, "runs at once (each gets cores / jobs threads, or OMP_NUM_THREADS)", ge=1)
    arch: str = arg("gpt2", "architecture", choices=["gpt2", "llama"])
    context_length: int = arg(128, "tokens per training sequence", ge=8)
    batch_size: int = arg(8, "sequences per step", ge=1)
    vocab_size: int | None = arg(None, "tokenizer size (default: from the corpus size)", ge=256)
    eval_batches: int = arg(16, "validation batches for each run's final loss", ge=1)
    seed: int = arg(1337, "seed of every run")
    device: str = device_flag()


def scaling_sweep(ns) -> None:
    a = from_namespace(ScalingSweepArgs, ns)
    from ..eval.sweep import SweepSettings, parse_size, sweep

    if not a.out:
        raise LMForgeError("--out is required (the sweep directory)")
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        parse_size(s)  # refuse a bad size before any work
    budgets = sorted(set(_numbers(a.flops, "--flops")))
    settings = SweepSettings(a.data, a.arch, a.context_length, a.batch_size, a.vocab_size, a.eval_batches, a.seed)
    results = sweep(settings, sizes, budgets, a.out, a.jobs, a.device)
    failed = [r["name"] for r in results if "error" in r]
    print(json.dumps({"runs": len(results), "failed": failed, "out": a.out}))


@dataclass
class ScalingFitArgs:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep's runs (Chinchilla's approach 3: Huber loss
    of log residuals, L-BFGS from a grid of starts, bootstrap intervals), the IsoFLOP parabolas
    (approach 2), and the compute-optimal rule N_opt(C) = G (C/6)^(beta/(alpha+beta)). Writes the
    fit as JSON and a plot; runs that failed are listed and left out."""

    sweep: str = arg(None, "sweep directory (from `lmforge scaling sweep`)", positional=True)
    out: str | None = arg(None, "fit JSON to write (default: SWEEP/fit.json); the plot goes next to it (.png)")
    max_flops: float | None = arg(None, "fit only the runs of budgets up to this (e.g. to predict bigger ones)", gt=0)
    bootstrap: int = arg(100, "bootstrap resamples for the confidence intervals (0 = none)", ge=0)
    plot: bool = arg(True, "write the plot")


def scaling_fit(ns) -> None:
    a = from_namespace(ScalingFitArgs, ns)
    from pathlib import Path

    from ..core.fileio import atomic_write_json
    from ..eval.scaling import comparison, fit_sweep, read_sweep

    runs, failed = read_sweep(a.sweep)
    for r in failed:
        print(f"skipped {r['name']}: {r.get('error', 'no validation loss')}", file=sys.stderr)
    if a.max_flops:
        runs = [r for r in runs if r.get("planned_flops", r["flops"]) <= a.max_flops]
    print(f"scaling fit: {len(runs)} runs; fitting L(N, D) from a grid of starts, then {a.bootstrap} bootstrap "
          "refits for the intervals (minutes; --bootstrap 0 skips them)", file=sys.stderr)
    fit = fit_sweep(runs, a.bootstrap)
    fit["skipped"] = [r["name"] for r in failed]
    plan = Path(a.sweep) / "sweep.json"
    if plan.exists():  # what the runs were trained with, so a run sized by this fit can say if it differs
        saved = json.loads(plan.read_text())
        fit["trained_on"] = {"vocab_size": saved.get("vocab_size"),
                             "context_length": saved.get("settings", {}).get("context_length")}
    out = Path(a.out or Path(a.sweep) / "fit.json")
    atomic_write_json(out, fit)
    print("\n".join(comparison(fit)), file=sys.stderr)
    if a.plot:
        from ..eval.scaling_plot import plot_fit

        plot_fit(fit, out.with_suffix(".png"))
    print(json.dumps({"fit": str(out), "plot": str(out.with_suffix(".png")) if a.plot else None,
                      **{k: round(fit["approach3"][k], 6) for k in ("E", "A", "B", "alpha", "beta")},
                      "n_opt_exponent": round(fit["compute_optimal"]["n_opt_exponent"], 6), "points": fit["points"],
                      "skipped": fit["skipped"]}))


@dataclass
class ScalingPredictArgs:
    """Use a fitted scaling law: the predicted loss of a model of N parameters trained on D tokens,
    and, for a compute budget C, the compute-optimal N and D (C = 6 N D)."""

    fit: str = arg(None, "fit JSON (from `lmforge scaling fit`)", positional=True)
    n: float | None = arg(None, "parameters N (every weight but the input embedding)", gt=0)
    d: float | None = arg(None, "training tokens D", gt=0)
    flops: float | None = arg(None, "compute budget C in training FLOPs", gt=0)


def scaling_predict(ns) -> None:
    a = from_namespace(ScalingPredictArgs, ns)
    from pathlib import Path

    from ..eval.scaling import predict

    try:
        fit = json.loads(Path(a.fit).read_text())
        fit["approach3"]["alpha"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LMForgeError(f"{a.fit} is not a fit from `lmforge scaling fit`") from None
    print(json.dumps(predict(fit, a.n, a.d, a.flops)))


@dataclass
class JudgeArgs:
    """Grade answers with an LLM judge (any OpenAI-compatible chat server, or a local model): a 1-10
    rating with a reason per answer, or with --pairwise A/B verdicts asked in both orders (a win
    counts only when both orders agree, which cancels position bias). Writes one JSON line per record
    and prints a summary (mean score, or wins/ties/win rate, with standard errors)."""

    answers: str = arg(None, "JSONL: {question, answer[, reference]} per line, or {question, answer_a, answer_b} "
                       "with --pairwise")
    api: str | None = arg(None, "the judge: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    model: str | None = arg(None, "the judge: a local model directory (instead of --api)")
    api_model: str | None = arg(None, "model name to ask the server for (default: its first)")
    api_key: str | None = arg(None, "bearer token for the server")
    rubric: str | None = arg(None, "a text file with the grading criteria (default: helpfulness, correctness, "
                             "relevance, clarity)")
    pairwise: bool = arg(False, "compare two answers per question instead of rating one")
    out: str | None = arg(None, "JSONL of every judgement (default: ANSWERS with .judged.jsonl)")
    max_tokens: int = arg(256, "longest judgement in tokens", ge=1)
    timeout: float = arg(120.0, "seconds to wait for the judge", gt=0)
    device: str = device_flag()


def judge(ns) -> None:
    a = from_namespace(JudgeArgs, ns)
    from pathlib import Path

    from ..core.fileio import atomic_write
    from ..eval.judge import DEFAULT_RUBRIC, judge_pairwise, judge_single, read_answers, summary
    from ..inference.client import open_generator

    if not a.answers:
        raise LMForgeError("--answers is required")
    rubric = DEFAULT_RUBRIC
    if a.rubric:
        rubric = Path(a.rubric).read_text(encoding="utf-8", errors="replace").strip()[:4000]
        if not rubric:
            raise LMForgeError(f"--rubric {a.rubric} is empty")
    rows = read_answers(a.answers, a.pairwise)
    judge_model = open_generator(a.model, a.api, a.api_model, a.api_key, a.device, a.timeout)
    results = (judge_pairwise if a.pairwise else judge_single)(judge_model, rows, rubric, a.max_tokens)
    out = a.out or str(Path(a.answers).with_suffix("")) + ".judged.jsonl"
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    print(json.dumps({**summary(results, a.pairwise), "judge": judge_model.name, "out": out}))
