"""A run killed during its checkpoint writes (`--save-every 1`, SIGKILL at random instants, 20 times)
leaves a model directory that loads, and `--resume` ends with exactly the weights of a run that was
never killed. `benchmarks/kill_during_save.py` runs the same trial 200 times."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kill_during_save import make_corpus, reference, trial  # noqa: E402


def test_twenty_kills_during_saves_resume_to_the_same_weights(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed runs (OMP_NUM_THREADS=1): the same arithmetic, the same weights
    try:
        _twenty_kills(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _twenty_kills(tmp_path) -> None:
    data = make_corpus(tmp_path / "data")
    want = reference(data, tmp_path / "reference")
    rng = random.Random(1234)
    results = [trial(data, tmp_path / f"run{i}", want, rng) for i in range(20)]
    assert all(r.startswith("ok") for r in results), results
    assert sum(r == "ok" for r in results) >= 15  # nearly every kill landed inside the run
