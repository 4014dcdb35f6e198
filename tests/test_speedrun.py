"""`lmforge speedrun` and `lmforge report`: a tiny end-to-end run (every stage, every metric in the
report), an exact resume after a SIGKILL inside the SFT stage, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_clean_error, run_cli

from lmforge.core.errors import LMForgeError
from lmforge.speedrun import data as sd
from lmforge.speedrun.plan import MIN_STEPS, PRESETS, SHARES, STAGES, stage_steps

TABLE = "## Metrics: base, SFT, aligned"


def metrics_table(report: str) -> list[str]:
    """The report's metric rows (the figures a resumed run must reproduce)."""
    lines = report.split(TABLE, 1)[1].strip().splitlines()
    return [line for line in lines[:lines.index("")] if line.startswith("|")]


EXTRA = "Speedrun extra text: the --data given besides pydocs joins the pretraining text. " * 20


def tiny_args(out: Path) -> list[str]:
    return ["speedrun", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--data",
            str(out.parent / "extra.txt")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speedrun") / "run"
    (out.parent / "extra.txt").write_text(EXTRA)
    proc = run_cli(*tiny_args(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"lmforge chat {out / 'aligned'}" in proc.stdout and f"lmforge serve {out / 'aligned'}" in proc.stdout
    return out


def test_every_stage_ran_and_the_report_names_every_metric(run):
    for stage in STAGES:
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["wall_s"] >= 0
    for model in ("base", "sft", "aligned"):
        assert (run / model / "model.safetensors").exists() and (run / model / "loss.png").exists()
    plan = json.loads((run / "plan.json").read_text())
    for stage, steps in plan["steps"].items():  # each training stage ran exactly its planned steps
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["steps"] == steps
    report = (run / "report.md").read_text()
    evals = {m: json.loads((run / "eval" / f"{m}.json").read_text())["figures"] for m in ("base", "sft", "aligned")}
    names = set(evals["base"])
    assert {"bits_per_byte", "held-out word F1", "rule followed", "held-out answer loss"} <= names
    assert {f"{t} {s}-shot" for t in ("arithmetic", "pydocs", "spam") for s in (0, 3)} <= names
    rows = metrics_table(report)
    assert len(rows) == 2 + len(names)
    for name in names:
        row = next(r for r in rows if r.startswith(f"| {name}"))
        assert row.count("|") == 5 and "| - " not in row, row  # a figure for each of the three models
    for section in ("## Machine and versions", "## Time budget", "## Scaling position", "## Loss curves",
                    "## Sample conversations", "## RAG answers", "tokens per parameter", "lmforge chat"):
        assert section in report
    assert "![base](base/loss.png)" in report
    rag = json.loads((run / "rag.json").read_text())
    assert rag and all(len(r["retrieved"]) == 3 for r in rag)
    assert "data/docs/" in report  # sources named relative to the run directory
    pretraining = (run / "data" / "train.jsonl").read_text() + (run / "data" / "val.jsonl").read_text()
    assert json.dumps(EXTRA)[1:-1] in pretraining  # --data joined pydocs
    # held-out questions name functions that no chat or preference record names
    held = {r["name"] for r in sd.read_jsonl(run / "data" / "eval.jsonl")}
    trained = (run / "data" / "sft.jsonl").read_text() + (run / "data" / "prefs.jsonl").read_text()
    assert held and not any(f"{name} " in trained or f"{name}?" in trained for name in held)


def test_report_rebuilds_from_the_run_directory(run):
    before = (run / "report.md").read_text()
    (run / "report.md").unlink()
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    after = (run / "report.md").read_text()
    strip = lambda text: [line for line in text.splitlines() if "Report written" not in line]  # noqa: E731
    assert strip(after) == strip(before)


def test_a_finished_run_is_skipped(run):
    proc = run_cli(*tiny_args(run), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("done already, skipped") == len(STAGES)


def test_sigkill_inside_sft_then_rerun_gives_the_same_figures(run):
    out = run.parent / "killed"  # beside the first run: the same --data path
    # the stages before SFT as the uninterrupted run left them (their own resume is the trainers')
    out.mkdir()
    for name in ("data", "base", "tokenizer.json", "plan.json", "machine.json"):
        (shutil.copytree if (run / name).is_dir() else shutil.copy)(run / name, out / name)
    (out / "stages").mkdir()
    for stage in ("data", "tokenizer", "pretrain"):
        shutil.copy(run / "stages" / f"{stage}.json", out / "stages")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lmforge", *tiny_args(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "sft" / "state").is_dir() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a checkpoint exists: the stage is half done
    finally:
        proc.wait()
    assert not (out / "stages" / "sft.json").exists(), "the SFT stage finished before it could be killed"
    assert not (out / "aligned").exists()
    done = run_cli(*tiny_args(out), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[4/7] sft ..." in done.stderr and "[3/7] pretrain: done already" in done.stderr
    assert "resumed from step" in done.stderr  # from the checkpoint, not from scratch
    for model in ("base", "sft", "aligned"):
        assert (json.loads((out / "eval" / f"{model}.json").read_text())["figures"]
                == json.loads((run / "eval" / f"{model}.json").read_text())["figures"]), model
    assert metrics_table((out / "report.md").read_text()) == metrics_table((run / "report.md").read_text())


def test_budget_split_and_minimum():
    preset = PRESETS["cpu"]
    probe = lambda batch, length: 0.01 * batch * length / 1024  # noqa: E731 - seconds per step
    steps, seconds = stage_steps(preset, 30, probe)
    for stage, share in SHARES.items():
        assert steps[stage] == int(share * 30 * 60 / seconds[stage])
    need = max(MIN_STEPS[s] * seconds[s] / SHARES[s] for s in SHARES) / 60
    with pytest.raises(LMForgeError, match=f"the minimum is {need:.1f}"):
        stage_steps(preset, need * 0.9, probe)
    gpu = PRESETS["gpu"]
    assert (gpu.depth, gpu.compile, gpu.context) == (12, True, 1024)


def test_bad_input_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("speedrun", "--data", str(empty), "--out", str(tmp_path / "a")), "--data")
    assert_clean_error(run_cli("speedrun", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a")),
                       "no such file")
    (tmp_path / "blank.txt").write_text("  \n")
    assert_clean_error(run_cli("speedrun", "--data", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "a")),
                       "empty")
    small = run_cli("speedrun", "--minutes", "0.2", "--out", str(tmp_path / "b"), "--device", "cpu", timeout=600)
    assert_clean_error(small, "the minimum is")
    assert not (tmp_path / "b").exists()  # refused before anything was written
    assert_clean_error(run_cli("report", str(tmp_path)), "no speedrun")
    assert not (tmp_path / "a").exists()


def test_another_preset_in_the_same_directory_is_refused(run):
    assert_clean_error(run_cli("speedrun", "--preset", "cpu", "--out", str(run)), "other settings")


def test_chat_data_rule_and_split():
    docs = ["json.dumps(obj, *, indent=None)\n\nSerialize obj to a JSON formatted str, using the conversion table.",
            "Module json\n\nJSON (JavaScript Object Notation) is a subset of JavaScript syntax used for data.",
            "os.getcwd()\n\nReturn a unicode string representing the current working directory, as text.",
            "short\n\ntoo short"]
    facts = sd.facts(docs)
    assert [(f.name, f.module) for f in facts] == [("json.dumps", False), ("json", True), ("os.getcwd", False)]
    assert sd.follows_rule(sd.with_rule(facts[0])) and not sd.follows_rule(facts[0].answer)
    assert sd.without_rule(sd.with_rule(facts[0])) == facts[0].answer
    assert sd.word_f1("Serialize obj", "serialize obj") == 1.0 and sd.word_f1("x", "y") == 0.0
    assert sd.split_corpus(docs * 3) == sd.split_corpus(docs * 3)  # deterministic


def test_judge_score_when_a_judge_is_given(run, monkeypatch):
    import lmforge.inference.client as client
    from lmforge.speedrun.evaluate import evaluate_model
    from lmforge.speedrun.plan import Plan

    asked = []

    class Judge:  # an OpenAI-compatible server's stand-in: rates every answer 7
        def __init__(self, url, *args):
            asked.append(url)

        def chat(self, messages, **kw):
            return "Clear enough. Rating: [[7]]"

    monkeypatch.setattr(client, "RemoteGenerator", Judge)
    plan = Plan.from_json(json.loads((run / "plan.json").read_text()))
    figures = evaluate_model(run / "aligned", run / "data", plan, judge="http://judge/v1")["figures"]
    assert asked == ["http://judge/v1"] and figures["judge score (1-10)"] == 7
    assert figures["rule followed"] == json.loads((run / "eval" / "aligned.json").read_text())["figures"][
        "rule followed"]


def test_a_stage_stopped_by_a_signal_is_not_marked_finished(tmp_path):
    from lmforge.speedrun.stages import _train_record

    with pytest.raises(LMForgeError, match="rerun the same command to resume"):
        _train_record({"step": 7, "interrupted": True}, tmp_path / "sft")
