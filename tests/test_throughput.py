"""Throughput hygiene: batches built ahead in a background thread (the same batches, never two
builds at once), tokens/s per process and MFU in metrics.jsonl, the GPU peak table, and
benchmarks/gpu_mfu.py on CPU at a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge import load
from lmforge.core import runtime
from lmforge.models.config import flops_per_token
from lmforge.models.sizing import arch_config
from lmforge.training.prefetch import Prefetcher
from lmforge.training.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parent.parent


class Stream:
    """batch(first, count) = the window indices, recording the thread and any overlap of calls."""

    def __init__(self) -> None:
        self.busy, self.overlaps, self.threads = False, 0, set()

    def batch(self, first: int, count: int) -> dict:
        self.overlaps += self.busy
        self.busy = True
        self.threads.add(threading.current_thread().name)
        time.sleep(0.002)
        self.busy = False
        return {"x": torch.arange(first, first + count)}


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetched_batches_are_the_asked_ones(enabled):
    stream = Stream()
    pre = Prefetcher(stream.batch, torch.device("cpu"), enabled=enabled)
    firsts = [0, 4, 8, 12, 100, 104, 3]  # 100 and 3 were not predicted: built on the spot
    for i, first in enumerate(firsts):
        assert pre.get(first, 4, then=first + 4)["x"].tolist() == list(range(first, first + 4))
        if i == 2:
            time.sleep(0.01)  # let the background build finish first, then overlap it with the next step
    pre.close()
    assert stream.overlaps == 0
    assert any(t.startswith("lmforge-prefetch") for t in stream.threads) == enabled


def test_metrics_log_tokens_per_process_and_mfu(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_PEAK_TFLOPS", "0.5")  # a peak for the CPU, so MFU is reported here too
    out = tmp_path / "run"
    pretrain(PretrainConfig(data=[str(corpus_dir)], out=str(out), n_layer=2, n_embd=32, n_head=2, context_length=16,
                            batch_size=4, max_steps=3, log_every=1, eval_every=100, eval_batches=1, vocab_size=300,
                            device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = load(out, device="cpu").config
    for row in rows:  # one process: the same rate; mfu is logged rounded to 4 decimals, hence abs 1e-4
        assert row["tokens_per_sec_per_process"] == pytest.approx(row["tokens_per_sec"], rel=1e-6)
        assert row["mfu"] == pytest.approx(flops_per_token(cfg) * row["tokens_per_sec"] / 0.5e12, abs=1e-4)
    monkeypatch.delenv("LMFORGE_PEAK_TFLOPS")
    assert runtime.peak_flops(torch.device("cpu")) is None  # no MFU on a CPU without a given peak


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Mystery GPU", None)])
def test_bf16_peaks_of_known_gpus(monkeypatch, name, peak):
    monkeypatch.delenv("LMFORGE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.peak_flops(torch.device("cuda", 0)) == peak


def test_gpu_mfu_script_runs_on_cpu_at_a_tiny_shape():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_mfu.py"), "--device", "cpu", "--n-layer", "2",
                           "--n-embd", "64", "--n-head", "2", "--context", "32", "--vocab", "256", "--max-batch", "4",
                           "--steps", "2", "--warmup", "1", "--no-compile", "--peak-tflops", "1"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["batch"] == 4 and result["tokens_per_sec"] > 0  # the doubling search reached --max-batch
    cfg_flops = flops_per_token(arch_config("gpt2", 256, 32, 2, 64, 2))
    assert result["flops_per_token"] == cfg_flops
    assert result["mfu"] == pytest.approx(cfg_flops * result["tokens_per_sec"] / 1e12, abs=1e-4)  # 4-decimal rounding


def test_time_to_quality_benchmark_runs_at_a_tiny_budget(corpus_dir, tmp_path):
    """Both arms train at each budget on the same shape, and the summary finds the target."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--data", str(corpus_dir),
                           "--budgets", "0.01", "--ablate-minutes", "0", "--new", '{"optimizer": "muon"}',
                           "--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--eval-batches", "1",
                           "--out", str(tmp_path / "ttq")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = json.loads((tmp_path / "ttq" / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["old-0.01min", "new-0.01min"]
    assert runs[1]["arm"]["optimizer"] == "muon" and runs[0]["arm"]["optimizer"] == "adamw"
    assert runs[0]["shape"] == runs[1]["shape"] == {"n_layer": 1, "n_embd": 32, "n_head": 1}
    assert summary["target_bpb"] == runs[0]["val_bpb"]
    assert (summary["reach_budget_min"] == 0.01) == (runs[1]["val_bpb"] <= runs[0]["val_bpb"])
