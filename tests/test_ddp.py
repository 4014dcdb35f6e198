"""Multi-process training under torchrun (2 CPU processes, gloo) follows the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(corpus_dir, tmp_path):
    common = ["pretrain", "--data", str(corpus_dir), "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
              "--context-length", "16", "--max-steps", "6", "--log-every", "1", "--eval-every", "100",
              "--vocab-size", "300", "--lr", "3e-3", "--device", "cpu", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "lmforge", *common, "--batch-size", "8",
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=200)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lmforge", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=200)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 processes" in ddp.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-4)
    assert one[0] != pytest.approx(one[-1], abs=1e-3)  # it actually trained
