"""Kill a training run during its checkpoint writes, many times: after every kill the model directory
loads, and `--resume` ends with exactly the weights of a run that was never killed.

A tiny `lmforge pretrain` with `--save-every 1` (every step writes the model directory and `state/`,
so most of its time is spent writing) is started as a subprocess, SIGKILLed at a random instant
after its first step, and resumed to the end. `tests/test_kill_during_save.py` runs 20 trials in
`make test`; this script runs as many as asked (the issue's 200 by default) and prints a tally.

    python benchmarks/kill_during_save.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lmforge
from lmforge.training.pretrain import PretrainConfig, pretrain

STEPS = 16


def config(data: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(**{**dict(data=[str(data)], out=str(out), n_layer=2, n_embd=32, n_head=2, context_length=16,
                                    batch_size=4, max_steps=STEPS, save_every=1, eval_every=8, eval_batches=1,
                                    log_every=1, vocab_size=300, lr=3e-3, dropout=0.1, device="cpu", seed=5,
                                    keep="last", tensorboard=False), **kw})


def make_corpus(directory: Path) -> Path:
    """Enough varied text for a 300-token vocabulary, written here (nothing downloaded)."""
    rng = random.Random(0)
    words = "the model reads a token and writes the next one while the loop saves every step".split()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)) + f" {i}\n")
    return directory


def reference(data: Path, out: Path) -> dict:
    """The weights of a run that was never killed."""
    pretrain(config(data, out))
    return load_file(out / "model.safetensors")


def trial(data: Path, out: Path, want: dict, rng: random.Random) -> str:
    """One kill at a random instant after the first step, a load, a resume; returns what happened
    ("ok", or the first thing that was wrong)."""
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; "
            f"from lmforge.training.pretrain import pretrain; from kill_during_save import config; "
            f"pretrain(config(Path({str(data)!r}), Path({str(out)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 1.0))  # a few steps' worth: lands anywhere in a step or its saves
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "config.json").exists():
        try:
            lmforge.load(out, device="cpu")
        except Exception as e:  # noqa: BLE001 (the tally reports what went wrong)
            return f"the model directory did not load after the kill: {type(e).__name__}: {e}"
    if (out / "state").exists():
        pretrain(config(data, out, resume=True))
    else:  # killed before the first checkpoint's state: nothing to resume, start again
        pretrain(config(data, out, overwrite=True))
    got = load_file(out / "model.safetensors")
    if got.keys() != want.keys() or any(not got[k].equal(want[k]) for k in want):
        return "the resumed run ended with other weights than an uninterrupted one"
    return "ok" if killed else "ok (finished before the kill)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as the killed runs (OMP_NUM_THREADS=1): the same arithmetic, the same weights
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(Path(tmp) / "data")
        want = reference(data, Path(tmp) / "reference")
        tally: dict[str, int] = {}
        for i in range(a.trials):
            result = trial(data, Path(tmp) / f"run{i}", want, rng)
            tally[result] = tally.get(result, 0) + 1
            print(f"trial {i + 1}/{a.trials}: {result}", flush=True)
    for result, n in sorted(tally.items()):
        print(f"{n:4d}  {result}")
    sys.exit(0 if all(r.startswith("ok") for r in tally) else 1)


if __name__ == "__main__":
    main()
