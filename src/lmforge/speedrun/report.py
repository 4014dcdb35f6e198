"""report.md, the report card, built from the run directory alone (`lmforge report DIR` rebuilds it):
plan.json, machine.json, stages/*.json, eval/*.json, rag.json and each model's metrics.jsonl."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write
from .data import RULE
from .plan import MODELS, SHARES, STAGES, Plan

CHINCHILLA = 20  # compute-optimal tokens per parameter (Hoffmann et al. 2022)
LOWER_IS_BETTER = ("bits_per_byte", "held-out answer loss")
TITLES = {"base": "base", "sft": "SFT", "aligned": "aligned"}


def machine_info(device: str = "auto") -> dict:
    """Where the run ran: the report's machine and versions."""
    import torch

    from .. import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": sys.version.split()[0], "torch": torch.__version__, "lmforge": __version__}


def _read(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows)]


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return (text[:limit] + " ...") if len(text) > limit else text or "(nothing)"


def metric_rows(evals: dict[str, dict]) -> list[list]:
    """One row per metric: its name, then each model's figure (None where it has none)."""
    names = list(dict.fromkeys(k for e in evals.values() for k in e["figures"]))
    return [[n + (" (lower is better)" if n in LOWER_IS_BETTER else ""),
             *(evals[m]["figures"].get(n) if m in evals else None for m in MODELS)] for n in names]


def build_report(out: Path) -> str:
    """The report's Markdown."""
    plan_json = _read(out / "plan.json")
    if plan_json is None:
        raise LMForgeError(f"{out} holds no speedrun (no plan.json)")
    plan = Plan.from_json(plan_json)
    machine = _read(out / "machine.json") or {}
    stages = {s: _read(out / "stages" / f"{s}.json") for s in STAGES}
    evals = {m: e for m in MODELS if (e := _read(out / "eval" / f"{m}.json"))}
    done = [s for s in STAGES if stages[s]]
    lines = [f"# lmforge speedrun: report card ({out.name})", "",
             f"Preset `{plan.preset.name}`, {plan.minutes:g} minutes, seed {plan.seed}, data: pydocs"
             + "".join(f" + {d}" for d in plan.data) + f". Stages finished: {len(done)} of {len(STAGES)}"
             + ("" if len(done) == len(STAGES) else f" (missing: {', '.join(s for s in STAGES if not stages[s])})")
             + f". Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             "## Machine and versions", "", *_table(["", ""], [[k, v] for k, v in machine.items()]), "",
             "## Time budget", "", f"Rule: {plan.rule}.", ""]
    total = sum(st["wall_s"] for st in stages.values() if st)
    rows = []
    for s in STAGES:
        st = stages[s] or {}
        tok_per_param = st["tokens"] / st["parameters"] if st.get("tokens") and st.get("parameters") else None
        rows.append([s, f"{int(SHARES[s] * 100)}%" if s in SHARES else "rest", plan.step_seconds.get(s),
                     plan.steps.get(s), st.get("steps"), st.get("wall_s"), st.get("parameters"), st.get("tokens"),
                     round(tok_per_param, 2) if tok_per_param else None])
    lines += _table(["stage", "share", "probe s/step", "steps planned", "steps run", "wall s", "parameters",
                     "tokens", "tokens/param"], rows)
    lines += ["", f"Wall time of all stages: {total / 60:.1f} minutes (a resumed stage counts its last session).",
              ""]
    base = stages["pretrain"]
    if base and base.get("tokens"):
        ratio = base["tokens"] / base["parameters"]
        off = max(ratio, CHINCHILLA) / min(ratio, CHINCHILLA)
        lines += ["## Scaling position", "",
                  f"The base model saw {base['tokens']:,} tokens with {base['parameters']:,} parameters: "
                  f"{ratio:.2f} tokens per parameter, against the compute-optimal ~{CHINCHILLA} "
                  f"({'under' if ratio < CHINCHILLA else 'over'}-trained by {off:.1f}x; "
                  f"{CHINCHILLA * base['parameters']:,} tokens would be compute-optimal for this size).", ""]
    lines += ["## Loss curves", ""]
    lines += [f"- {TITLES[m]} ({stage}): ![{m}]({m}/loss.png)" for m, stage in MODELS.items()
              if (out / m / "loss.png").exists()]
    lines += ["", "## Metrics: base, SFT, aligned", ""]
    if evals:
        lines += _table(["metric", *TITLES.values()], metric_rows(evals))
        lines += ["", f"The preference rule: {RULE}. Held-out questions name functions that no training record "
                  "names (their docstrings were in the pretraining text). Word F1 compares an answer's words with "
                  "the docstring's first paragraph; the built-in tasks are `lmforge eval`'s, scored by acc_norm "
                  "(multiple choice) or exact match.", ""]
        lines += ["## Sample conversations", ""]
        first = next(iter(evals.values()))
        for i, sample in enumerate(first["samples"]):
            lines += [f"**User:** {_quote(sample['question'])}", ""]
            lines += [f"- *{TITLES[m]}:* {_quote(e['samples'][i]['answer'])}" for m, e in evals.items()]
            lines += [f"- *reference:* {_quote(sample['reference'])}"] if sample.get("reference") else []
            lines += [""]
    rag = _read(out / "rag.json")
    where = lambda h: f"{h['path']}:{h['start_line']}-{h['end_line']}"  # noqa: E731 - relative to the run
    if rag:
        lines += ["## RAG answers (the aligned model, 3 sources)", ""]
        for r in rag:
            cited = ", ".join(f"[{c['n']}] {where(c)}" for c in r["citations"])
            got = ", ".join(f"{h['n']}. {where(h)}" for h in r["retrieved"])
            lines += [f"**Q:** {r['question']}", "", f"**A:** {_quote(r['answer'])}", "",
                      f"Cited: {cited or 'none'}. Retrieved: {got}.", ""]
    # a text fence: the docs walkthrough runs bash blocks, and these name this run's directory
    lines += ["## Talk to it", "", "```text", f"lmforge chat {out / 'aligned'}", f"lmforge serve {out / 'aligned'}",
              f"lmforge rag ask {out / 'index'} \"What does json.dumps do?\" --model {out / 'aligned'} -k 3", "```", ""]
    return "\n".join(lines)


def write_report(out: str | Path) -> Path:
    """Write (or rewrite) DIR/report.md from what the run directory holds; returns its path."""
    out = Path(out)
    if not out.is_dir():
        raise LMForgeError(f"no such run directory: {out}")
    path = out / "report.md"
    atomic_write(path, build_report(out))
    return path
