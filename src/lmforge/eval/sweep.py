"""`lmforge scaling sweep`: an IsoFLOP grid of pretraining runs, resumable, for `scaling fit`.

For each compute budget C and each size (dN, or LxW: L layers of width W), the run trains on the
tokens the budget allows: D = C / (FLOPs per token of that shape), the model's exact training FLOPs
per token (6 per weight plus attention's work; `models.config.flops_per_token`). N, the parameter
count, is the weights that cost compute per token: every weight but the input embedding lookup (the
output layer counts; `models.sizing.trained_params`), so C = 6 N D + the attention term.

Every run is `lmforge pretrain` in a child process, sharing one tokenizer (SWEEP/tokenizer.json)
and one train/validation split. SWEEP/sweep.json holds the plan; SWEEP/runs/NAME/ each run;
SWEEP/results/NAME.json the finished run's N, D, C, validation loss and bits per byte (or,
for a run that failed, its error). Running the sweep again skips finished runs, resumes a
killed one from its last checkpoint (pretrain --resume) and retries failed ones; the grid may
grow between calls (more sizes, more budgets), the settings may not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json

HEARTBEAT = 30.0  # seconds between progress lines while a run trains
SAVE_EVERY = 25  # steps between checkpoints, so that a killed run loses little


@dataclass
class SweepSettings:
    """What every run of a sweep shares (a sweep directory keeps these once chosen)."""

    data: list[str]
    arch: str = "gpt2"
    context_length: int = 128
    batch_size: int = 8
    vocab_size: int | None = None
    eval_batches: int = 16
    seed: int = 1337


def parse_size(text: str) -> tuple[str, int, int]:
    """"dN" (N layers of width 64*N) or "LxW" (L layers of width W) -> (label, n_layer, n_embd)."""
    from ..models.sizing import depth_of

    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if m:
        n_layer, n_embd = int(m.group(1)), int(m.group(2))
        if not (1 <= n_layer <= 64 and 8 <= n_embd <= 8192 and n_embd % 8 == 0):
            raise LMForgeError(f"size {text!r}: LxW needs 1-64 layers and a width of 8-8192, a multiple of 8")
        return f"{n_layer}x{n_embd}", n_layer, n_embd
    depth = depth_of(text.strip())
    return f"d{depth}", depth, 64 * depth


def run_name(flops: float, label: str) -> str:
    return f"C{flops:.3g}_{label}".replace("+", "")


def plan(settings: SweepSettings, sizes: list[str], budgets: list[float], out: Path) -> list[dict]:
    """The grid: one entry per (budget, size) with N, the planned D and C. Trains (or reuses) the
    sweep's tokenizer, whose size fixes the output layer and so the FLOPs per token."""
    from ..models.config import flops_per_token
    from ..models.sizing import arch_config, trained_params
    from ..text.corpus import load_corpus
    from ..text.tokenizer import Tokenizer, auto_vocab_size
    from ..training.pretrain import padded_vocab

    out.mkdir(parents=True, exist_ok=True)
    saved = out / "sweep.json"
    if saved.exists():
        before = json.loads(saved.read_text())["settings"]
        if before != asdict(settings):
            changed = sorted(k for k in before if before[k] != asdict(settings).get(k))
            raise LMForgeError(f"{out} holds a sweep with other settings ({', '.join(changed)}); use another --out")
    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        corpus = load_corpus(settings.data)
        vocab = settings.vocab_size or auto_vocab_size(corpus.num_bytes)
        print(f"sweep: training a {vocab}-token tokenizer on {corpus.describe()}", file=sys.stderr)
        Tokenizer.train(corpus.documents, vocab, show_progress=False).save(tok_path)
    vocab = padded_vocab(Tokenizer.from_file(tok_path).vocab_size)
    tokens_per_step = settings.batch_size * settings.context_length
    runs = []
    for c in budgets:
        for label, n_layer, n_embd in map(parse_size, sizes):
            cfg = arch_config(settings.arch, vocab, settings.context_length, n_layer, n_embd)
            tokens = c / flops_per_token(cfg)
            if tokens < 4 * tokens_per_step:
                raise LMForgeError(f"budget {c:g} gives {label} only {tokens:,.0f} tokens (under 4 steps of "
                                   f"{tokens_per_step}); raise --flops or drop the size")
            runs.append({"name": run_name(c, label), "size": label, "n_layer": n_layer, "n_embd": n_embd, "flops": c,
                         "params": trained_params(cfg),
                         "tokens": int(tokens), "flops_per_token": flops_per_token(cfg)})
    known = {r["name"]: r for r in (json.loads(saved.read_text())["runs"] if saved.exists() else [])}
    known.update({r["name"]: r for r in runs})
    atomic_write_json(saved, {"settings": asdict(settings), "vocab_size": vocab, "runs": list(known.values())})
    return runs


def _command(settings: SweepSettings, run: dict, out: Path, device: str) -> list[str]:
    rundir = out / "runs" / run["name"]
    base = [sys.executable, "-m", "lmforge", "pretrain", "--out", str(rundir)]
    if (rundir / "state").exists() and (rundir / "train_config.yaml").exists():
        return base + ["--resume", "--device", device]  # a killed run: continue exactly where it stopped
    return base + ["--overwrite", "--data", *settings.data, "--tokenizer", str(out / "tokenizer.json"),
                   "--arch", settings.arch, "--n-layer", str(run["n_layer"]), "--n-embd", str(run["n_embd"]),
                   "--context-length", str(settings.context_length),
                   "--batch-size", str(settings.batch_size), "--max-tokens", str(run["tokens"]),
                   "--eval-every", str(10**9), "--eval-batches", str(settings.eval_batches), "--keep", "last",
                   "--save-every", str(SAVE_EVERY), "--log-every", "10", "--seed", str(settings.seed),
                   "--device", device]


def final_metrics(rundir: Path) -> dict:
    """The last evaluation of a run (metrics.jsonl); {} when it has none."""
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    if not evals:
        return {}
    return {"val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1].get("val_bpb"), "steps": evals[-1]["step"],
            "trained_tokens": evals[-1]["tokens"]}


def run_progress(run: dict, rundir: Path) -> str | None:
    """How far a running grid point is, from the last row of its metrics.jsonl (None before the first)."""
    try:
        lines = (rundir / "metrics.jsonl").read_text().strip().splitlines()
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):  # not written yet, or a row being written
        return None
    if not row or "tokens" not in row:
        return None
    return f"{run['name']}: {row['tokens'] / run['tokens']:.0%} of its {run['tokens']:,} tokens, loss {row['loss']:.3f}"


def run_one(settings: SweepSettings, run: dict, out: Path, device: str, threads: int) -> dict:
    """Run (or resume) one grid point to the end; its result (also written to results/NAME.json)."""
    (out / "logs").mkdir(exist_ok=True)
    (out / "results").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    with open(out / "logs" / f"{run['name']}.log", "a") as log:
        proc = subprocess.Popen(_command(settings, run, out, device), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=HEARTBEAT)
                except subprocess.TimeoutExpired:  # a run takes minutes: say how far it is, not only in its log
                    line = run_progress(run, out / "runs" / run["name"])
                    if line:
                        print(f"  {line} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        except BaseException:  # Ctrl-C reaches the run too (one process group): let it checkpoint, then go
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    result = {**run, "seconds": round(time.time() - start, 1)}
    metrics = final_metrics(out / "runs" / run["name"]) if proc.returncode == 0 else {}
    if proc.returncode != 0:
        lines = (out / "logs" / f"{run['name']}.log").read_text(errors="replace").strip().splitlines()
        errors = [x for x in lines if x.startswith("error:")] or lines[-1:] or ["no output"]
        result["error"] = f"exit code {proc.returncode}: {errors[-1][:300]}"
    elif metrics.get("trained_tokens", 0) < run["tokens"]:  # stopped early (Ctrl-C): it checkpointed
        result["error"] = "stopped before its budget; run the sweep again to resume it"
    else:
        result.update(metrics)
        result["flops"] = result["trained_tokens"] * run["flops_per_token"]  # what was actually spent
        result["tokens"] = result["trained_tokens"]
        result["planned_flops"] = run["flops"]
    atomic_write_json(out / "results" / f"{run['name']}.json", result)
    return result


def sweep(settings: SweepSettings, sizes: list[str], budgets: list[float], out: str | Path, jobs: int = 1,
          device: str = "auto") -> list[dict]:
    """Run every grid point not finished yet, `jobs` at a time; the results of the whole grid."""
    out = Path(out)
    runs = plan(settings, sizes, budgets, out)
    done, todo = [], []
    for run in runs:
        res = out / "results" / f"{run['name']}.json"
        if res.exists() and "error" not in json.loads(res.read_text()):
            done.append(json.loads(res.read_text()))
        else:
            todo.append(run)
    print(f"sweep: {len(runs)} runs, {len(done)} finished, {len(todo)} to run, {jobs} at a time", file=sys.stderr)
    # each run's threads: as OMP_NUM_THREADS says, else the cores shared out (oversubscribed cores crawl)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))

    def one(run: dict) -> dict:
        print(f"sweep: {run['name']}: N={run['params'] / 1e6:.2f}M D={run['tokens']:,} C={run['flops']:.3g}",
              file=sys.stderr)
        r = run_one(settings, run, out, device, threads)
        status = f"error ({r['error']})" if "error" in r else f"val_loss {r['val_loss']:.4f} in {r['seconds']:.0f} s"
        print(f"sweep: {run['name']}: {status}", file=sys.stderr)
        return r

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, run) for run in todo]
    try:
        done += [f.result() for f in futures]
    finally:  # Ctrl-C: runs not started are dropped; running ones checkpoint (they got the signal too) and stop
        pool.shutdown(wait=True, cancel_futures=True)
    return done
