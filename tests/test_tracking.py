"""Tracking runs: TensorBoard event files beside metrics.jsonl (read back with tensorboard's own
reader), and `lmforge runs compare`."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import fails, reverse_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.cli import main
from lmforge.core.errors import LMForgeError
from lmforge.training.compare import compare_runs
from lmforge.training.pretrain import PretrainConfig, pretrain
from lmforge.training.tasks.instruct import InstructConfig, finetune_instruct
from lmforge.training.tracking import Board, scalars


def tiny(corpus_dir, out, **kw) -> PretrainConfig:
    base = dict(data=[str(corpus_dir)], out=str(out), n_layer=2, n_embd=32, n_head=2, context_length=16,
                batch_size=4, max_steps=12, save_every=4, eval_every=6, eval_batches=2, log_every=1,
                vocab_size=300, lr=3e-3, device="cpu", seed=5)
    return PretrainConfig(**{**base, **kw})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def board(out) -> EventAccumulator:
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    events.Reload()
    return events


class Crash(Exception):
    pass


def crash_at(step: int):
    def on_step(s: int) -> None:
        if s == step:
            raise Crash

    return on_step


@pytest.fixture(scope="module")
def resumed(corpus_dir, tmp_path_factory):
    """A run that died at step 7 (rows 1-6 logged, checkpoint at 4), then resumed to step 12."""
    out = tmp_path_factory.mktemp("tracking") / "run"
    with pytest.raises(Crash):
        pretrain(tiny(corpus_dir, out), on_step=crash_at(7))
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    pretrain(tiny(corpus_dir, out, resume=True))
    return out


def test_scalars_equal_metrics_jsonl_and_a_resumed_run_shows_each_step_once(resumed):
    logged, events = rows(resumed), board(resumed)
    assert len(list((resumed / "tb").glob("events.out.tfevents.*"))) == 2  # the first run's file, the resumed one's
    assert [r["step"] for r in logged] == list(range(1, 13))
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tokens", "tokens_per_sec", "elapsed_s", "val_loss", "val_bpb"} <= tags
    for tag in tags:
        want = {r["step"]: r[tag] for r in logged if tag in r}
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        # each step once, in order (steps 5 and 6 ran twice: the first run's values are purged)
        assert [s for s, _ in got] == sorted(want), tag
        assert [v for _, v in got] == pytest.approx([want[s] for s, _ in got], rel=1e-6), tag  # float32 events
    assert [e.step for e in events.Scalars("val_bpb")] == [6, 12]


def test_no_tensorboard_writes_no_event_files(corpus_dir, tmp_path, capsys):
    out = tmp_path / "quiet"
    assert main(["pretrain", "--data", str(corpus_dir), "--out", str(out), "--n-layer", "1", "--n-embd", "32",
                 "--context-length", "16", "--batch-size", "2", "--vocab-size", "300", "--max-steps", "2",
                 "--log-every", "1", "--device", "cpu", "--no-tensorboard"]) == 0
    assert (out / "metrics.jsonl").exists() and not (out / "tb").exists()
    # resumed with tracking on: the rows it kept come first, so the curves start at step 1
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--log-every", "1"]) == 0
    assert [e.step for e in board(out).Scalars("loss")] == [r["step"] for r in rows(out)] == [1, 2, 3]


def test_validation_samples_are_text_and_exports_leave_the_event_files(corpus_dir, tmp_path):
    from lmforge.formats.hf_dir import export_hf

    base = tmp_path / "base"
    pretrain(tiny(corpus_dir, base, context_length=96, max_steps=2, tensorboard=False))
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reverse_records(40, seed=0)))
    out = tmp_path / "inst"
    finetune_instruct(InstructConfig(base=str(base), data=str(data), out=str(out), max_steps=2, eval_every=2,
                                     batch_size=4, samples=2, device="cpu"))
    shown = next(r["val_samples"] for r in rows(out) if "val_samples" in r)
    [text] = board(out).Tensors("val_samples/text_summary")
    rendered = text.tensor_proto.string_val[0].decode()
    assert text.step == 2 and all(s["prompt"][:40] in rendered for s in shown)
    assert rendered.count("**1. prompt**") == rendered.count("**2. response**") == 1
    export_hf(out, tmp_path / "hf")
    assert not any(p.name == "tb" or p.name.startswith("events.") for p in (tmp_path / "hf").rglob("*"))


def test_nested_metrics_are_flattened_and_lists_left_out():
    row = {"step": 3, "val_loss": 0.5, "val_per_class": {"spam": {"f1": 0.9, "support": 12}}, "ok": True,
           "val_confusion": [[1, 0], [0, 1]], "val_samples": [{"prompt": "a", "response": "b"}]}
    assert dict(scalars(row)) == {"val_loss": 0.5, "val_per_class/spam/f1": 0.9, "val_per_class/spam/support": 12.0}


def test_a_missing_tensorboard_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(LMForgeError, match="pip install tensorboard, or train with --no-tensorboard"):
        Board(tmp_path / "tb").start(None, [])


def test_runs_compare_plots_and_tabulates_both_runs(resumed, corpus_dir, tmp_path, capsys):
    other = tmp_path / "other"
    pretrain(tiny(corpus_dir, other, max_steps=6, eval_every=3, lr=1e-2, tensorboard=False))
    png = tmp_path / "charts" / "val.png"
    assert main(["runs", "compare", str(resumed), str(other), "--metric", "val_bpb", "--out", str(png)]) == 0
    out, err = capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "steps", "tokens", "time"] and len(lines) == 3
    assert lines[1].startswith(str(resumed)) and lines[2].startswith(str(other))
    assert lines[1].split()[1] == "12" and lines[2].split()[1] == "6"
    assert f"chart: {png}" in err

    assert main(["runs", "compare", str(resumed), str(other), "--metric", "lr", "--x", "tokens", "--out",
                 str(tmp_path / "lr.png"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    first = table["runs"][0]
    assert table["metric"] == "lr" and table["x"] == "tokens" and [r["run"] for r in table["runs"]] == \
        [str(resumed), str(other)]
    assert first["steps"] == 12 and first["final_loss"] == rows(resumed)[-1]["loss"]
    assert first["best_val_loss"] == min(r["val_loss"] for r in rows(resumed) if "val_loss" in r)
    assert first["final_lr"] == rows(resumed)[-1]["lr"] and first["final_val_bpb"] == rows(resumed)[-1]["val_bpb"]


def test_runs_compare_bad_input_is_one_line(resumed, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, "has no metrics.jsonl", "runs", "compare", str(resumed), str(empty), "--out", str(tmp_path / "a.png"))
    fails(capsys, "no run logged 'val_accuracy'", "runs", "compare", str(resumed), "--metric", "val_accuracy",
          "--out", str(tmp_path / "b.png"))
    fails(capsys, "missing required argument", "runs", "compare")
    fails(capsys, "invalid choice", "runs", "compare", str(resumed), "--x", "epochs")
    fails(capsys, "given twice", "runs", "compare", str(resumed), str(resumed))
    (empty / "metrics.jsonl").write_text("")
    fails(capsys, "has no rows", "runs", "compare", str(empty))
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    with pytest.raises(LMForgeError, match="x axis"):
        compare_runs([resumed], x="wall")
