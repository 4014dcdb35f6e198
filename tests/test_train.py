"""The training loop: exact resume, crash safety, NaN handling, schedules, budgets, sizing."""

from __future__ import annotations

import copy
import json
import math
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lmforge.training.state as training_state
from lmforge import load
from lmforge.core.errors import LMForgeError
from lmforge.core.runtime import Dist
from lmforge.data.collate import IGNORE, collate
from lmforge.models.config import ModelConfig
from lmforge.models.sizing import choose_depth, sized_config, trained_params
from lmforge.models.transformer import Transformer
from lmforge.training.loop import NonFiniteLoss, TrainConfig, Trainer
from lmforge.training.pretrain import PretrainConfig, pretrain
from lmforge.training.rundir import Run
from lmforge.training.schedule import lr_at
from lmforge.training.tasks.lm import LMTask


def tiny(corpus_dir, out, **kw) -> PretrainConfig:
    base = dict(data=[str(corpus_dir)], out=str(out), n_layer=2, n_embd=32, n_head=2, context_length=16,
                batch_size=4, max_steps=12, save_every=4, eval_every=6, eval_batches=2, log_every=1,
                vocab_size=300, lr=3e-3, dropout=0.1, device="cpu", seed=5)
    return PretrainConfig(**{**base, **kw})


def weights(out) -> dict:
    return load_file(str(out / "model.safetensors"))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b, tol=1e-6):
    """For exact-resume checks: the same kernels on the same shapes in the same order (Muon's bf16
    steps included) give the same bits; the bound only absorbs safetensors' fp32 round trip (none)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= tol, k


@pytest.mark.numerics
def test_interrupted_then_resumed_run_equals_uninterrupted(corpus_dir, tmp_path):
    full = tmp_path / "full"
    pretrain(tiny(corpus_dir, full))
    part = tmp_path / "part"
    # Ctrl-C after step 6: the loop finishes the step, saves, and stops (dropout RNG included).
    state = pretrain(tiny(corpus_dir, part), on_step=lambda s: s == 6 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 6
    assert json.loads((part / "state" / "trainer.json").read_text())["step"] == 6
    state = pretrain(tiny(corpus_dir, part, resume=True))
    assert state["step"] == 12
    assert_same_weights(full, part)  # exact: same shapes, same order, RNG state restored
    assert [r["loss"] for r in metrics(part)] == pytest.approx([r["loss"] for r in metrics(full)], abs=1e-6)


def test_crash_during_a_save_leaves_a_usable_directory(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = training_state.replace_dir
    calls = []

    def dies_on_second_save(new, dest):
        calls.append(dest)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        real(new, dest)

    monkeypatch.setattr(training_state, "replace_dir", dies_on_second_save)
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(tiny(corpus_dir, out, max_steps=8))
    monkeypatch.setattr(training_state, "replace_dir", real)
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 4
    lm = load(out, device="cpu")  # the model directory is whole
    assert lm.generate("The", max_new_tokens=3, seed=0) is not None
    assert pretrain(tiny(corpus_dir, out, max_steps=8, resume=True))["step"] == 8
    assert not (out / "state.new").exists()


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_loss, calls = LMTask.loss, []

    def explodes(self, model, batch):
        loss, weight, n = real_loss(self, model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 5 else loss), weight, n

    monkeypatch.setattr(LMTask, "loss", explodes)
    with pytest.raises(NonFiniteLoss, match=r"nan at step 5.*checkpoint \(step 4\)"):
        pretrain(tiny(corpus_dir, out, max_steps=10))
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 4
    assert all(math.isfinite(t.abs().sum().item()) for t in weights(out).values())


@pytest.fixture
def one_thread():
    """Pins torch to one thread (xdist workers already are; a plain `pytest` run is not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Bounds on the logged loss (rounded to 1e-6), for batch 8 against 2 x 4 over 5 steps. The gradients
# differ only in fp32 summation order (~1e-7 relative), so with AdamW (fp32 throughout) the losses
# agree to the rounding: 1e-6 seen under every MKL/oneDNN/ATen setting of `make test-numerics`.
# Muon's Newton-Schulz runs in bf16 (8-bit mantissa): such a difference can flip a rounding of the
# orthogonalised update, 2^-8 of a 0.01 step, and the losses then drift apart by up to 2e-5 (seen on an
# Intel Xeon with AVX-512, and on AMD with MKL_CBWR=COMPATIBLE).
@pytest.mark.numerics
@pytest.mark.parametrize("optimizer, bound", [("adamw", 1e-5), ("muon", 2e-4)])
def test_gradient_accumulation_matches_a_bigger_batch(corpus_dir, tmp_path, one_thread, optimizer, bound):
    settings = dict(dropout=0.0, max_steps=5, optimizer=optimizer)
    a = pretrain(tiny(corpus_dir, tmp_path / "a", batch_size=4, grad_accum=2, **settings))
    b = pretrain(tiny(corpus_dir, tmp_path / "b", batch_size=8, grad_accum=1, **settings))
    assert a["tokens"] == b["tokens"]
    la, lb = [r["loss"] for r in metrics(tmp_path / "a")], [r["loss"] for r in metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, abs=bound)


class UnevenTargets:
    """Two examples whose responses have 3 and 32 target tokens (as in instruction tuning with
    masked prompts): averaging per micro-batch would weigh the 3 tokens like the 32."""

    windows_per_epoch = 2

    def __init__(self) -> None:
        ids = torch.randint(0, 64, (33,), generator=torch.Generator().manual_seed(0)).tolist()
        self.rows = [(ids[:20], [IGNORE] * 17 + ids[17:20]), (ids, [IGNORE] + ids[1:])]

    def batch(self, first: int, count: int) -> dict:
        return collate([self.rows[k % 2] for k in range(first, first + count)], pad_id=0)

    def loss(self, model, batch):
        n = int((batch["y"] != IGNORE).sum())
        return model(batch["x"], batch["y"]), n, n

    def evaluate(self, model) -> dict:
        return {}


@pytest.mark.numerics
def test_accumulation_weighs_every_target_token_alike(tmp_path):
    """Two micro-batches with 3 and 32 targets give the gradient of one batch holding both."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=40, n_layer=1, n_head=2, n_embd=16))
    results = []
    for batch_size, accum in ((1, 2), (2, 1)):
        m = copy.deepcopy(model)
        cfg = TrainConfig(batch_size=batch_size, grad_accum=accum, max_steps=1, device="cpu")
        trainer = Trainer(m, UnevenTargets(), cfg, Run(tmp_path, lambda *a, **k: None), 1e-3, Dist(),
                          torch.device("cpu"))
        loss, tokens = trainer.compute_gradients()
        results.append((loss, tokens, [p.grad.clone() for p in m.parameters()]))
    (loss_a, tokens_a, grads_a), (loss_b, tokens_b, grads_b) = results
    # Batch 2 against 1 + 1: fp32 summation order only (~1e-7 relative); rel 1e-5 and atol 1e-7 (gradients
    # near zero) leave room for MKL's AVX-512 kernels, which sum in another order on Intel.
    assert tokens_a == tokens_b == 35 and loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


class FirstTokenClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 2)

    def forward(self, ids, mask):
        return self.emb(ids[:, 0])


@pytest.mark.numerics
def test_class_weighted_accumulation_equals_one_batch(tmp_path):
    """Classification weighs examples (by their class weight): micro-batches with different
    class mixes add up to the class-weighted mean of the whole batch."""
    from lmforge.training.tasks.classify import ClassifyTask

    train = [([i % 8, 1], int(i % 4 == 0)) for i in range(8)]
    grads = []
    for batch_size, accum in ((1, 4), (2, 2), (4, 1)):
        torch.manual_seed(0)
        model = FirstTokenClassifier()
        task = ClassifyTask(train, [], ["a", "b"], 0, 0, torch.tensor([0.7, 2.5]), batch_size)
        cfg = TrainConfig(batch_size=batch_size, grad_accum=accum, max_steps=1, device="cpu")
        Trainer(model, task, cfg, Run(tmp_path, lambda *a, **k: None), 1e-3, Dist(),
                torch.device("cpu")).compute_gradients()
        grads.append(model.emb.weight.grad.clone())
    # An embedding lookup and a weighted mean over 8 rows: fp32 summation order only.
    assert all(torch.allclose(g, grads[-1], atol=1e-7) for g in grads)


def test_mlm_token_budget_counts_every_token_read(corpus_dir, tmp_path):
    """--max-tokens counts the tokens read (as sizing does), not only the masked ones."""
    state = pretrain(tiny(corpus_dir, tmp_path / "mlm", objective="mlm", max_steps=None, max_tokens=4 * 16 * 3))
    assert state["step"] == 3 and state["tokens"] == 4 * 16 * 3


def test_budgets_are_checked_before_sizing(corpus_dir, tmp_path):
    """`--max-steps -5 --size auto` used to die in the sizing maths (math domain error)."""
    with pytest.raises(LMForgeError, match="--max-steps must be >= 1"):
        pretrain(tiny(corpus_dir, tmp_path / "neg", n_layer=None, n_embd=None, n_head=None, size="auto", max_steps=-5))
    with pytest.raises(LMForgeError, match="give a training budget"):
        pretrain(tiny(corpus_dir, tmp_path / "none", max_steps=None))
    assert not (tmp_path / "neg").exists() and not (tmp_path / "none").exists()


def test_token_and_time_budgets(corpus_dir, tmp_path):
    state = pretrain(tiny(corpus_dir, tmp_path / "tok", max_steps=None, max_tokens=4 * 16 * 7))
    assert state["step"] == 7 and state["tokens"] == 4 * 16 * 7
    state = pretrain(tiny(corpus_dir, tmp_path / "min", max_steps=None, max_minutes=0.02))
    assert state["step"] >= 1 and state["elapsed"] >= 1.2


def test_learning_rate_schedules():
    cfg = TrainConfig(min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(cfg, 1.0, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 1.0, 9, 0.09) == pytest.approx(1.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.09))))
    assert lr_at(cfg, 1.0, 50, 0.5) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(cfg, 1.0, 100, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, warmup_steps=10)
    assert lr_at(wsd, 1.0, 50, 0.7) == 1.0
    assert lr_at(wsd, 1.0, 90, 0.9) == pytest.approx(0.5)
    assert lr_at(TrainConfig(schedule="constant", warmup_steps=0), 1.0, 0, 0.0) == 1.0


def test_warmup_ends_by_a_tenth_of_any_budget():
    """Warmup is capped by the budget, whatever its kind: at 5% of a run, 50 warmup steps or not,
    the LR is half way up."""
    cfg = TrainConfig(schedule="constant", warmup_steps=50)
    assert lr_at(cfg, 1.0, 2, 0.05) == pytest.approx(0.5)
    assert lr_at(cfg, 1.0, 3, 0.10) == pytest.approx(1.0)
    assert lr_at(cfg, 1.0, 2, 0.0) == pytest.approx(3 / 50)  # a long run: the warmup steps rule


@pytest.mark.parametrize("budget", [{"max_tokens": 4 * 16 * 12}, {"epochs": 0.05}])
def test_short_runs_of_any_budget_leave_warmup(corpus_dir, tmp_path, budget):
    """A 12-step run by tokens (or a short one by epochs) with 50 warmup steps used to end inside
    warmup, never reaching the peak LR; now warmup ends at a tenth of the run."""
    pretrain(tiny(corpus_dir, tmp_path / "run", max_steps=None, warmup_steps=50, eval_every=1000, **budget))
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert len(lrs) >= 8 and max(lrs) > 0.8 * 3e-3, lrs


def test_auto_size_follows_the_compute_optimal_rule():
    d4 = sized_config("gpt2", 4, 4096, 256)
    depth, report = choose_depth("gpt2", 4096, 256, 2048, max_tokens=20 * trained_params(d4), seconds=None,
                                 step_seconds=lambda c: 1.0)
    assert depth == 4 and "20 tokens per parameter" in report[-1]
    probes = []

    def fake_step_seconds(cfg):  # a machine doing 1e12 FLOP/s
        from lmforge.models.config import flops_per_token
        probes.append(cfg.n_layer)
        return flops_per_token(cfg) * 2048 / 1e12

    seconds = 20 * trained_params(sized_config("gpt2", 8, 4096, 256)) * \
        __import__("lmforge.models.config", fromlist=["x"]).flops_per_token(sized_config("gpt2", 8, 4096, 256)) / 1e12
    depth, _ = choose_depth("gpt2", 4096, 256, 2048, max_tokens=None, seconds=seconds,
                            step_seconds=fake_step_seconds)
    assert depth == 8 and probes[0] == 4 and probes[-1] == 8


def test_auto_size_is_recorded_for_reproduction(corpus_dir, tmp_path):
    out = tmp_path / "auto"
    pretrain(tiny(corpus_dir, out, n_layer=None, n_embd=None, n_head=None, size="auto", max_steps=2))
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["size"].startswith("d") and saved["n_layer"] == int(saved["size"][1:])
    cfg = json.loads((out / "config.json").read_text())["model"]
    assert cfg["n_layer"] == saved["n_layer"] and cfg["n_embd"] == saved["n_embd"]


def test_loss_goes_down(tiny_run):
    rows = metrics(tiny_run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "val_loss" in rows[-1] and "val_bpb" in rows[-1]
    for key in ("step", "tokens", "loss", "lr", "tokens_per_sec", "elapsed_s"):
        assert key in rows[0]
    assert (tiny_run / "loss.png").stat().st_size > 1000
    assert torch.is_tensor(load(tiny_run, device="cpu").model.wte.weight)


def test_sigterm_saves_a_checkpoint_that_resumes(corpus_dir, tmp_path):
    """A real SIGTERM to a real process: the step finishes, a checkpoint is written, --resume goes on."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(corpus_dir), "--out", str(out), "--n-layer", "2",
            "--n-embd", "32", "--n-head", "2", "--context-length", "16", "--batch-size", "4", "--vocab-size", "300",
            "--max-steps", "100000", "--log-every", "1", "--eval-every", "100000", "--save-every", "100000",
            "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping after this step" in err and "continue with --resume" in err
    saved = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert 5 <= saved < 100000 and metrics(out)[-1]["step"] == saved
    # only what a resume may change is given; everything else comes from the run's train_config.yaml
    state = pretrain(PretrainConfig(out=str(out), resume=True, max_steps=saved + 3, device="cpu"))
    assert state["step"] == saved + 3
