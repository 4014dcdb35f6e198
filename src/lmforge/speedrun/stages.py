"""The speedrun's stages, each a library call. A stage that finished left stages/NAME.json (written
atomically, last), so a rerun skips it; a training stage that was cut off resumes from its last
checkpoint (the trainers' own --resume), so it ends where an uninterrupted run would."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write, atomic_write_json
from ..text.corpus import load_corpus
from . import data as sd
from .data import read_jsonl, write_jsonl
from .evaluate import evaluate_model
from .plan import CHAT_LENGTH, MODELS, STAGES, Plan, Preset, load_or_make_plan
from .report import machine_info, write_report


def say(msg: str) -> None:
    """Progress, on stderr."""
    print(msg, file=sys.stderr, flush=True)


def check_data(paths: list[str]) -> None:
    """--data must hold text: a missing or empty file or folder is a one-line error, before anything
    runs (the reader's own warnings about it are left out: the error says it all)."""
    for p in paths:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                load_corpus([p])
        except LMForgeError as e:
            raise LMForgeError(f"--data {p}: {e}") from None


def probe(preset: Preset) -> Callable[[int, int], float]:
    """Seconds per training step of the preset's model at a (batch, length), measured here."""
    from ..core.runtime import resolve_device
    from ..models.sizing import measure_step_seconds, sized_config

    def seconds(batch: int, length: int) -> float:
        return measure_step_seconds(sized_config("gpt2", preset.depth, preset.vocab, length), batch,
                                    resolve_device(preset.device))
    return seconds


def speedrun(out: str | Path, preset: Preset, minutes: float, data: list[str] | None = None, seed: int = 1337,
             judge: str | None = None) -> Path:
    """Run (or finish) the speedrun in `out`; returns report.md's path."""
    out, data = Path(out), list(data or [])
    check_data(data)
    t0 = time.time()
    plan, resumed = load_or_make_plan(out, preset, minutes, data, seed, probe(preset))
    if not (out / "machine.json").exists():
        atomic_write_json(out / "machine.json", machine_info(preset.device))
    say(f"speedrun in {out}: preset {preset.name}, {minutes:g} minutes; steps "
        + ", ".join(f"{k} {v:,}" for k, v in plan.steps.items()) + (" (plan read back: resuming)" if resumed else ""))
    runners = {"data": _data, "tokenizer": _tokenizer, "pretrain": _pretrain, "sft": _sft, "dpo": _dpo,
               "eval": lambda o, p: _eval(o, p, judge), "rag": _rag}
    for n, stage in enumerate(STAGES, 1):
        marker = out / "stages" / f"{stage}.json"
        if marker.exists():
            say(f"[{n}/{len(STAGES)}] {stage}: done already, skipped")
            continue
        say(f"[{n}/{len(STAGES)}] {stage} ...")
        start = time.time()
        record = runners[stage](out, plan) or {}
        atomic_write_json(marker, {"stage": stage, "wall_s": round(time.time() - start, 1), **record})
    report = write_report(out)
    say(f"speedrun finished in {(time.time() - t0) / 60:.1f} minutes (this session); report: {report}")
    return report


def _data(out: Path, plan: Plan) -> dict:
    docs = load_corpus(["pydocs"]).documents[:plan.preset.docs]  # a preset's cap falls on pydocs, never on --data
    docs += load_corpus(plan.data).documents if plan.data else []
    train, val = sd.split_corpus(docs)
    d = out / "data"
    write_jsonl(d / "train.jsonl", [{"text": t} for t in train])
    write_jsonl(d / "val.jsonl", [{"text": t} for t in val])
    p = plan.preset
    chats = sd.chat_data(sd.facts(docs), p.sft_records, p.pref_pairs, p.eval_questions, plan.seed)
    for name, rows in chats.items():
        write_jsonl(d / f"{name}.jsonl", rows)
    # the index holds the held-out questions' own documents first, so RAG has their answers to find; one
    # file per document, named after what it documents, so a citation reads docs/json.dumps.txt:3-9
    wanted = {r["name"] for r in chats["eval"]}
    for i, doc in enumerate(sorted(docs, key=lambda doc: sd.title_name(doc) not in wanted)[:p.rag_docs]):
        name = re.sub(r"[^\w.-]+", "_", sd.title_name(doc) or doc.partition("\n")[0])[:80]
        atomic_write(d / "docs" / f"{i:04d}-{name}.txt", doc + "\n")
    return {"documents": len(docs), "train_documents": len(train), "val_documents": len(val),
            "bytes": sum(len(t.encode()) for t in docs), **{f"{k}_records": len(v) for k, v in chats.items()}}


def _tokenizer(out: Path, plan: Plan) -> dict:
    from ..text.tokenizer import Tokenizer

    docs = [r["text"] for r in read_jsonl(out / "data" / "train.jsonl")]
    tok = Tokenizer.train(docs, plan.preset.vocab, show_progress=False)
    tok.save(out / "tokenizer.json")
    return {"vocab_size": tok.vocab_size}


def _resume_or_fresh(run: Path) -> dict:
    """A run directory with a checkpoint resumes; anything else starts over."""
    return {"resume": True} if (run / "state").is_dir() else {"overwrite": True}


def _train_record(state: dict, run: Path) -> dict:
    """Steps, tokens and parameters of a finished training stage, from its run directory. A stage
    stopped by Ctrl-C or SIGTERM (the loop saves a checkpoint and returns) is not finished: no
    marker, and the rerun resumes it."""
    from safetensors import safe_open

    if state.get("interrupted"):
        raise LMForgeError(f"stopped in {run.name} at step {state.get('step')}: rerun the same command to resume")

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"steps": state.get("step"), "tokens": rows[-1].get("tokens") if rows else None, "parameters": params}


def _common(plan: Plan, steps: int) -> dict:
    """The loop settings every training stage shares: the plan's steps, four evaluations, and a
    checkpoint every tenth of the stage (what an interrupted stage resumes from)."""
    return dict(max_steps=steps, eval_every=max(1, steps // 4), save_every=max(1, steps // 10),
                log_every=max(1, min(10, steps // 20)), seed=plan.seed, device=plan.preset.device,
                compile=plan.preset.compile)


def _pretrain(out: Path, plan: Plan) -> dict:
    from ..training.config import PretrainConfig
    from ..training.pretrain import pretrain

    p, run = plan.preset, out / "base"
    cfg = PretrainConfig(data=[str(out / "data" / "train.jsonl")], val_data=[str(out / "data" / "val.jsonl")],
                         tokenizer=str(out / "tokenizer.json"), out=str(run), n_layer=p.depth, n_embd=64 * p.depth,
                         context_length=p.context, batch_size=p.batch, eval_batches=4,
                         **_common(plan, plan.steps["pretrain"]), **_resume_or_fresh(run))
    return _train_record(pretrain(cfg), run)


def _sft(out: Path, plan: Plan) -> dict:
    from ..training.config import InstructConfig
    from ..training.tasks.instruct import finetune_instruct

    run = out / "sft"
    cfg = InstructConfig(base=str(out / "base"), out=str(run), data=str(out / "data" / "sft.jsonl"),
                         context_length=CHAT_LENGTH, batch_size=plan.preset.chat_batch, samples=1, eval_batches=4,
                         **_common(plan, plan.steps["sft"]), **_resume_or_fresh(run))
    return _train_record(finetune_instruct(cfg), run)


def _dpo(out: Path, plan: Plan) -> dict:
    from ..training.align_config import DPOConfig
    from ..training.tasks.dpo import train_dpo

    run = out / "aligned"
    cfg = DPOConfig(base=str(out / "sft"), out=str(run), data=str(out / "data" / "prefs.jsonl"),
                    context_length=CHAT_LENGTH, batch_size=plan.preset.chat_batch, eval_batches=4,
                    **_common(plan, plan.steps["dpo"]), **_resume_or_fresh(run))
    return _train_record(train_dpo(cfg), run)


def _eval(out: Path, plan: Plan, judge: str | None) -> dict:
    """Each model's figures in eval/NAME.json (one file per model, so a rerun redoes only the rest)."""
    for name in MODELS:
        file = out / "eval" / f"{name}.json"
        if not file.exists():
            say(f"  evaluating {name} ...")
            atomic_write_json(file, evaluate_model(out / name, out / "data", plan, judge))
    return {}


def _rag(out: Path, plan: Plan) -> dict:
    from ..formats.load import load_model
    from ..inference.client import LocalGenerator
    from ..rag.ask import ask
    from ..rag.index import Encoder, Index, build_index

    # inside the run directory, so the sources are named data/docs/NAME.txt: short in the prompt (which must
    # hold 3 of them in the context) and in the report, wherever --out is
    with contextlib.chdir(out):
        stats = build_index(["data/docs"], "index", Encoder("minilm", plan.preset.device),
                            size=plan.preset.rag_chunk, overlap=plan.preset.rag_chunk // 6)
        index, generator = Index("index", device=plan.preset.device), LocalGenerator(
            load_model("aligned", plan.preset.device))
        answers = []
        for row in read_jsonl(Path("data") / "eval.jsonl")[:plan.preset.samples]:
            result = ask(index, generator, row["question"], k=3, max_tokens=96, seed=plan.seed)
            answers.append({"question": row["question"], "name": row["name"], **result})
    atomic_write_json(out / "rag.json", answers)
    return {"chunks": stats["chunks"], "files": stats["files"]}
