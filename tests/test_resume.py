"""Resuming a run as the README shows it: the saved budget, failures that change nothing, what it
says, the schedule when the budget changes, and which weights the model directory keeps."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lmforge.training.metrics as training_metrics
from lmforge.core.errors import LMForgeError
from lmforge.training.config import TrainConfig
from lmforge.training.pretrain import PretrainConfig, pretrain
from lmforge.training.schedule import Schedule, lr_at
from lmforge.training.tasks.lm import LMTask


def tiny(corpus_dir, out, **kw) -> PretrainConfig:
    base = dict(data=[str(corpus_dir)], out=str(out), n_layer=2, n_embd=32, n_head=2, context_length=16,
                batch_size=4, max_steps=12, save_every=4, eval_every=6, eval_batches=2, log_every=1,
                vocab_size=300, lr=3e-3, dropout=0.1, device="cpu", seed=5)
    return PretrainConfig(**{**base, **kw})


def stop_at(step: int):
    return lambda s: s == step and signal.raise_signal(signal.SIGINT)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_without_a_budget_keeps_the_saved_one(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(tiny(corpus_dir, out), on_step=stop_at(6))
    assert "stopped: checkpoint saved at step 6" in capsys.readouterr().err
    state = pretrain(PretrainConfig(out=str(out), resume=True, device="cpu"))  # `lmforge pretrain --out DIR --resume`
    assert state["step"] == 12 and not state["interrupted"] and state["rank"] == 0
    err = capsys.readouterr().err
    assert "resumed from step 6 of 12" in err and f"model directory: {out}" in err.splitlines()[-1]
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["resume"] is False and saved["max_steps"] == 12


def test_a_failed_resume_leaves_the_run_as_it_was(corpus_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny(corpus_dir, out))
    before = snapshot(out)
    with pytest.raises(LMForgeError, match="nothing to do: the run already reached its budget of 12 steps; "
                                           "pass a larger --max-steps to continue"):
        pretrain(PretrainConfig(out=str(out), resume=True, device="cpu"))
    with pytest.raises(LMForgeError, match="budget of 0.001 epochs.*larger --epochs"):
        pretrain(PretrainConfig(out=str(out), resume=True, device="cpu", epochs=0.001))
    with pytest.raises(LMForgeError, match="incompatible config: batch_size=16"):
        pretrain(PretrainConfig(out=str(out), resume=True, device="cpu", batch_size=16))
    assert snapshot(out) == before


def test_an_interrupted_run_reports_its_last_step(corpus_dir, tmp_path):
    """Ctrl-C between two logged rows: the returned metrics, the last row and the checkpoint agree."""
    out = tmp_path / "run"
    state = pretrain(tiny(corpus_dir, out, log_every=5, eval_every=100), on_step=stop_at(7))
    assert state["interrupted"] and state["step"] == 7 and state["metrics"]["step"] == 7
    assert rows(out)[-1]["step"] == 7 == json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert [r["step"] for r in rows(out)] == [5, 7]


def test_the_progress_bar_of_a_resumed_run_starts_where_it_stands(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(tiny(corpus_dir, out), on_step=stop_at(6))
    bars = []

    class Recording(training_metrics.tqdm):
        def __init__(self, *args, **kw):
            bars.append(kw)
            super().__init__(*args, **kw)

    monkeypatch.setattr(training_metrics, "tqdm", Recording)
    pretrain(tiny(corpus_dir, out, resume=True))
    assert bars[0]["initial"] == pytest.approx(50.0)  # so the rate (and ETA) counts new progress only


def test_a_changed_budget_continues_the_schedule_from_where_it_stood():
    cfg = TrainConfig(warmup_steps=0, min_lr_ratio=0.1)
    # 10 of 20 steps done (schedule at 0.5); resumed with --max-steps 12: progress jumps to 10/12
    s = Schedule(cfg, 1.0, resumed_at=(10 / 12, 0.5))
    # float64 schedule arithmetic in other orders: ~1e-16, default rel 1e-6
    assert s.lr(10, 10 / 12) == pytest.approx(lr_at(cfg, 1.0, 10, 0.5))  # no jump
    assert s.position(11 / 12) == pytest.approx(0.75) and s.position(1.0) == pytest.approx(1.0)
    longer = Schedule(cfg, 1.0, resumed_at=(10 / 40, 0.5))  # --max-steps 40: the rest stretched
    assert longer.position(10 / 40) == pytest.approx(0.5) and longer.position(25 / 40) == pytest.approx(0.75)
    # same budget: exactly the same schedule (bit-for-bit resume), not a re-planned one that rounds differently
    assert Schedule(cfg, 1.0, resumed_at=(1 / 37, 1 / 37)).position(24 / 41) == 24 / 41
    assert Schedule(cfg, 1.0, resumed_at=(0.5, 1.0)).position(0.8) == 1.0  # a finished run goes on at its final LR


def test_shortening_the_budget_on_resume_does_not_drop_the_lr(corpus_dir, tmp_path):
    out = tmp_path / "run"
    # cosine: at step 10 of 20 it is mid-decay, where an abrupt drop would show (wsd is still at its peak)
    pretrain(tiny(corpus_dir, out, max_steps=20, eval_every=100, schedule="cosine"), on_step=stop_at(10))
    pretrain(tiny(corpus_dir, out, max_steps=12, resume=True, eval_every=100, schedule="cosine"))
    lr = {r["step"]: r["lr"] for r in rows(out)}
    assert lr[11] > 0.85 * lr[10]  # it used to fall to a quarter at once
    assert lr[10] > lr[11] > lr[12] > 3e-4  # and then decays to the new end


def test_keep_best_holds_the_best_weights_and_resume_goes_on_from_the_last(corpus_dir, tmp_path, monkeypatch):
    """Evaluations at steps 4, 8, 12 with validation losses 3, 1, 2: the model directory holds step
    8, state/ the last step, and a resumed run goes on from there exactly."""
    val_losses: list[float] = []
    monkeypatch.setattr(LMTask, "evaluate", lambda self, model: {"val_loss": val_losses.pop(0)})

    def cfg(out, **kw):
        return tiny(corpus_dir, out, eval_every=4, save_every=4, **kw)

    best = tmp_path / "best"
    val_losses[:] = [3.0, 1.0]
    pretrain(cfg(best, keep="best"), on_step=stop_at(10))
    val_losses[:] = [2.0]
    state = pretrain(cfg(best, keep="best", resume=True))
    assert state["step"] == 12 and state["model_step"] == 8
    assert json.loads((best / "config.json").read_text())["checkpoint"] == {"step": 8, "val_loss": 1.0,
                                                                            "keep": "best"}

    last = tmp_path / "last"  # the same run keeping the last step, stopped at 8, then finished
    val_losses[:] = [3.0, 1.0]
    pretrain(cfg(last, keep="last"), on_step=stop_at(8))
    at_8 = load_file(str(last / "model.safetensors"))
    val_losses[:] = [2.0]
    pretrain(cfg(last, keep="last", resume=True))
    at_12 = load_file(str(last / "state" / "model.safetensors"))

    kept, resumed = load_file(str(best / "model.safetensors")), load_file(str(best / "state" / "model.safetensors"))
    # stopped at 10 vs at 8, then resumed: the same kernels on the same shapes in the same order (Muon's bf16
    # Newton-Schulz included, one process): bit-identical
    assert kept.keys() == at_8.keys() and all(torch.equal(kept[k], at_8[k]) for k in kept)
    assert resumed.keys() == at_12.keys() and all(torch.equal(resumed[k], at_12[k]) for k in resumed)
    assert not torch.equal(kept["wte.weight"], resumed["wte.weight"])
