"""A prepared GPU check: one run, at most ~8 minutes on one H100, through every CUDA path of lmforge.

GPU time comes in rare, short windows and a machine can vanish mid-run, so each step runs in a
subprocess of its own under its own timeout, and its JSON line is appended to --out (flushed and
fsync'ed) as soon as it ends: a vanished machine loses only the step in flight.

  mfu_adamw         a training step at GPT-2 124M shapes (benchmarks/gpu_mfu.py): compiled, bf16 autocast,
                    fused AdamW, fixed --batch-size; tokens/s and MFU
  mfu_muon          the same with --optimizer muon
  mfu_transformers  the same step in transformers' GPT2LMHeadModel (sdpa); the summary has lmforge/transformers
  pretrain          `lmforge pretrain --data pydocs --compile --max-minutes 2`; checks metrics.jsonl (mfu, val_bpb)
  serve             16 streams against `lmforge serve --device ...` (benchmarks/serve_throughput.py)
  quant_decode      greedy decode tokens/s through the engine with fp32, bf16, int8 and int4 weights (on CUDA
                    the engine computes in bf16 autocast), whether int8/int4 pick the tokens fp32 does, and
                    whether int4 ran PyTorch's int4 kernel or fell back to dequantising (never run on a GPU yet)

--out gets one JSON line per step after an "env" line (versions, GPU, CPU, time): {"step", "status": ok |
failed | timeout | skipped, "seconds", "result", "reason" (skipped), "stderr_tail" (failed, timeout)}, and
a "summary" line at the end. A step whose optional dependency (transformers; fastapi, uvicorn, httpx) is
missing is skipped. Only torch, tokenizers, safetensors, numpy, pyyaml and tqdm are needed.

    python benchmarks/gpu_check.py --out gpu.jsonl               # on the GPU, from the repo root
    python benchmarks/gpu_check.py --out gpu.jsonl --steps pretrain,serve --budget-scale 1.5
    python benchmarks/gpu_check.py --smoke --device cpu --out smoke.jsonl   # every step, tiny, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_mfu and serve_throughput: benchmarks/ is not a package
if importlib.util.find_spec("lmforge") is None:  # not installed: the checkout's, here and in every child
    sys.path.insert(0, str(HERE.parent / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

# Seconds per step on one H100; they sum to 480 (8 minutes). Compilation is most of the MFU steps
# (mfu_muon reuses mfu_adamw's compiled kernels from inductor's cache); pretrain is 2 minutes + startup.
TIMEOUTS = {"mfu_adamw": 95, "mfu_muon": 45, "mfu_transformers": 90, "pretrain": 170, "serve": 45, "quant_decode": 35}
SMOKE_TIMEOUT = 90


class Skip(Exception):
    """The step cannot run here (an optional dependency is missing)."""


def need(*modules: str) -> None:
    """Skip the step unless each module imports (a broken install counts as missing)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise Skip(f"{name} is not installed ({e})") from None


def gpt2_shape(a: argparse.Namespace):
    from lmforge.models.sizing import arch_config

    return arch_config("gpt2", 512, 64, 2, 64, 2) if a.smoke else arch_config("gpt2", 50304, 1024, 12, 768, 12)


def loss_problems(loss: float) -> list[str]:  # a step's "problems" make it "failed", its numbers kept
    return [] if math.isfinite(loss) else [f"the loss is {loss}"]


def step_mfu(a: argparse.Namespace, optimizer: str) -> dict:
    import gpu_mfu

    r = gpu_mfu.measure(gpt2_shape(a), torch.device(a.device), optimizer, a.batch_size, steps=a.train_steps,
                        warmup=a.warmup, compile_=a.compile)
    return {**r, "compiled": a.compile, "problems": loss_problems(r["loss"])}


def step_mfu_transformers(a: argparse.Namespace) -> dict:
    """gpu_mfu's step and timing around GPT2LMHeadModel: same shapes, batch, autocast and fused AdamW."""
    need("transformers")
    import gpu_mfu
    import torch.nn.functional as F
    import transformers

    from lmforge.core.runtime import peak_flops
    from lmforge.models.config import flops_per_token
    from lmforge.training.config import TrainConfig
    from lmforge.training.optim import make_optimizer

    cfg, device = gpt2_shape(a), torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as gpu_mfu.measure sets it
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").to(device).train()

    class WithLoss(torch.nn.Module):  # make_step calls model(inputs, targets) -> loss, as lmforge's model takes
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = self.hf(input_ids=idx, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # fp32, as HF's own loss

    model = WithLoss()
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw"), 1e-4, device)
    step = gpu_mfu.make_step(model, optimizer, device, a.compile)
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, cfg.context_length + 1), device=device)
    tokens_per_sec, loss = gpu_mfu.time_steps(step, x, device, a.train_steps, a.warmup)
    peak = peak_flops(device)
    return {"transformers": transformers.__version__, "attn_implementation": hf.config._attn_implementation,
            "batch": a.batch_size, "tokens_per_sec": round(tokens_per_sec, 1), "loss": round(loss, 4),
            "mfu": peak and round(flops_per_token(cfg) * tokens_per_sec / peak, 4), "params": hf.num_parameters(),
            "compiled": a.compile, "problems": loss_problems(loss)}


def step_pretrain(a: argparse.Namespace) -> dict:
    """The CLI end to end, then its metrics.jsonl: mfu on every CUDA row where the peak is known (none on CPU)."""
    from lmforge.core.runtime import peak_flops

    out = Path(a.workdir) / "run"
    args = ["--data", "pydocs", "--out", str(out), "--device", a.device, "--compile" if a.compile else "--no-compile"]
    if a.smoke:
        args += ["--max-steps", "5", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--context-length", "64",
                 "--vocab-size", "512", "--batch-size", "4", "--eval-every", "5", "--eval-batches", "2",
                 "--log-every", "1"]
    else:
        args += ["--max-minutes", str(a.pretrain_minutes), "--batch-size", "32", "--eval-every", "250"]
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", *args], capture_output=True, text=True)
    print(proc.stderr[-3000:], file=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge pretrain exited with {proc.returncode}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "tokens_per_sec" in r]
    evals = [r for r in rows if "val_bpb" in r]
    want_mfu = torch.device(a.device).type == "cuda" and peak_flops(torch.device(a.device)) is not None
    problems = [] if evals else ["no val_bpb in metrics.jsonl"]
    if want_mfu and not all("mfu" in r for r in train):
        problems.append("mfu missing from CUDA rows of metrics.jsonl")
    if not want_mfu and any("mfu" in r for r in train):
        problems.append("mfu reported where the device's peak is unknown")
    mfus = [r["mfu"] for r in train if "mfu" in r]
    model = json.loads((out / "config.json").read_text())["model"]
    return {"rows": len(rows), "step": rows[-1]["step"], "tokens": rows[-1]["tokens"],
            "elapsed_s": train[-1]["elapsed_s"] if train else None,
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train) if train else None,
            "mfu": statistics.median(mfus) if mfus else None, "val_bpb": evals[-1]["val_bpb"] if evals else None,
            "model": {k: model[k] for k in ("n_layer", "n_embd", "n_head", "context_length", "vocab_size")},
            "problems": problems}


def step_serve(a: argparse.Namespace) -> dict:
    need("fastapi", "uvicorn", "httpx")
    import serve_throughput

    small = {"max_tokens": 8, "rounds": 1, "n_layer": 2, "n_embd": 64} if a.smoke else {}
    res = serve_throughput.bench(clients=16, device=a.device, **small)
    rate = {m: statistics.median(r for r, _ in runs) for m, runs in res.items()}
    ttft = {m: [t for _, ts in runs for t in ts] for m, runs in res.items()}
    return {"clients": 16, **{f"{m}_tok_s": round(r, 1) for m, r in rate.items()},
            "ratio": round(rate["concurrent"] / rate["sequential"], 2),
            **{f"{m}_ttft_p50_ms": round(serve_throughput.pct(t, 0.5) * 1e3) for m, t in ttft.items()}}


def step_quant_decode(a: argparse.Namespace) -> dict:
    """Decode through the engine as `generate --quantize` does (load_model); int8 checked against fp32
    by each one's argmax along fp32's greedy sequence (one forward pass, so one early near-tie cannot
    derail the rest of the comparison as it would a free-running decode)."""
    from serve_throughput import make_model_dir

    from lmforge.core.runtime import autocast
    from lmforge.formats.load import load_model
    from lmforge.inference.engine import Engine, Request
    from lmforge.models.quant import _int4_kernel_ok

    device = torch.device(a.device)
    n_layer, n_embd, new, prompt_len = (2, 64, 16, 8) if a.smoke else (12, 768, 128, 16)
    model_dir = Path(a.workdir) / "model"
    make_model_dir(model_dir, n_layer, n_embd)  # GPT-2 layout, random weights, context 256
    out: dict = {"n_layer": n_layer, "n_embd": n_embd, "new_tokens": new}
    seqs, argmaxes = {}, {}
    for mode in ("fp32", "bf16", "int8", "int4"):
        lm = load_model(model_dir, a.device, quantize=mode if mode.startswith("int") else None)
        if mode == "bf16":
            lm.model.to(torch.bfloat16)
        prompt = torch.randint(0, lm.tokenizer.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
        engine = Engine(lm.model, slots=1, max_len=prompt_len + new)
        rates = []
        for _ in range(3):  # the first one warms up
            t = time.perf_counter()
            [[sample]] = engine.generate([Request(prompt.tolist(), max_tokens=new, temperature=0)])
            rates.append(len(sample.tokens) / (time.perf_counter() - t))
        seqs[mode] = sample.tokens
        ids = torch.tensor([prompt.tolist() + seqs["fp32"]], device=device)
        with torch.inference_mode(), autocast(device):
            argmaxes[mode] = lm.model(ids)[0, prompt_len - 1:-1].argmax(-1).cpu()
        out[mode] = {"tokens_per_sec": round(statistics.median(rates[1:]), 1),
                     "same_greedy_tokens_as_fp32": seqs[mode] == seqs["fp32"],
                     "argmax_agreement_with_fp32": round((argmaxes[mode] == argmaxes["fp32"]).float().mean().item(), 4)}
        if mode == "int4":
            out[mode]["kernel"] = "int4pack" if _int4_kernel_ok(device.type) else "dequantised per call"
    # Random weights leave near-ties (bf16 alone moves ~3% of argmaxes at 12 x 768 on CPU); a broken
    # int8 path agrees on ~1/vocab of them.
    agree = out["int8"]["argmax_agreement_with_fp32"]
    out["problems"] = [f"int8 agrees with fp32 on only {agree:.0%} of tokens"] if agree < 0.8 else []
    return out


STEPS = {"mfu_adamw": lambda a: step_mfu(a, "adamw"), "mfu_muon": lambda a: step_mfu(a, "muon"),
         "mfu_transformers": step_mfu_transformers, "pretrain": step_pretrain, "serve": step_serve,
         "quant_decode": step_quant_decode}


def run_child(a: argparse.Namespace) -> int:
    """In the step's subprocess: run it, write {"status", "result"} to --result; an exception exits 1."""
    try:
        result = STEPS[a.step](a)
        status = "failed" if result.get("problems") else "ok"
    except Skip as e:
        result, status = {"reason": str(e)}, "skipped"
    Path(a.result).write_text(json.dumps({"status": status, "result": result}))
    return 0


def run_step(name: str, timeout: float, argv: list[str]) -> dict:
    """The step in its own process group (so a timeout also ends the servers and CLIs it started)."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "log"
        cmd = [sys.executable, __file__, *argv, "--step", name, "--result", str(result_path), "--workdir", tmp]
        t = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = True
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                pass
            finally:  # the whole group, also after a clean exit or Ctrl-C: nothing it started may outlive it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        line: dict = {"step": name, "seconds": round(time.perf_counter() - t, 1)}
        tail = log_path.read_text(errors="replace")[-2000:]
        if timed_out:
            return {**line, "status": "timeout", "timeout_s": timeout, "result": {}, "stderr_tail": tail}
        if proc.returncode != 0 or not result_path.exists():
            return {**line, "status": "failed", "returncode": proc.returncode, "result": {}, "stderr_tail": tail}
        child = json.loads(result_path.read_text())
        line.update(status=child["status"], result=child["result"])
        if child["status"] == "skipped":
            line["reason"] = child["result"]["reason"]
        if child["status"] == "failed":
            line["stderr_tail"] = tail
        return line


def git_commit() -> str | None:
    with contextlib.suppress(OSError):  # no git, or no repository: a copied tree
        proc = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return proc.stdout.strip() or None
    return None


def environment(a: argparse.Namespace, timeouts: dict) -> dict:
    from lmforge.core.runtime import cpu_name

    return {"step": "env", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu": cpu_name(),
            "cpus": os.cpu_count(), "commit": git_commit(), "device": a.device, "smoke": a.smoke,
            "timeouts": timeouts, "argv": sys.argv[1:]}


def append(path: Path, record: dict) -> None:
    """One line, on disk before the next step starts."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def brief(line: dict) -> str:
    """The step's headline numbers, or why it did not pass."""
    r = line.get("result") or {}
    if line["status"] != "ok":
        last = (line.get("stderr_tail") or "").strip().splitlines()[-1:]
        return line.get("reason") or "; ".join(r.get("problems") or []) or " ".join(last)
    if "int8" in r:  # quant_decode
        modes = ", ".join(f"{m} {r[m].get('tokens_per_sec', 'skipped')}" for m in ("fp32", "bf16", "int8", "int4"))
        return f"decode tok/s: {modes}; int8 agreement {r['int8']['argmax_agreement_with_fp32']}"
    keys = ("tokens_per_sec", "mfu", "val_bpb", "concurrent_tok_s", "ratio")
    return ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON lines, appended (required unless --step)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in this order")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="every step at tiny sizes (CPU, seconds each)")
    ap.add_argument("--batch-size", type=int, help="MFU steps' batch at context 1024 (default 16; smoke 4)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile in the training steps (default: on, off with --smoke)")
    ap.add_argument("--pretrain-minutes", type=float, default=2.0)
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's timeout")
    ap.add_argument("--timeouts", default="", help="per-step overrides in seconds, e.g. pretrain=200,serve=60")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # a child's own step, --result and --workdir
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.batch_size = a.batch_size or (4 if a.smoke else 16)
    a.compile = (not a.smoke) if a.compile is None else a.compile
    a.train_steps, a.warmup = (3, 1) if a.smoke else (20, 5)
    if a.step:
        sys.exit(run_child(a))
    if a.out is None:
        ap.error("--out is required")
    names = [n for n in a.steps.split(",") if n]
    if unknown := [n for n in names if n not in STEPS]:
        ap.error(f"unknown steps {unknown} (choose from {', '.join(STEPS)})")
    overrides = {k: float(v) for k, v in (kv.split("=") for kv in a.timeouts.split(",") if kv)}
    timeouts = {n: overrides.get(n, (SMOKE_TIMEOUT if a.smoke else TIMEOUTS[n]) * a.budget_scale) for n in names}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(a, timeouts)
    append(a.out, env)
    print(f"gpu_check: {env['gpu'] or env['cpu']}, torch {env['torch']}, device {a.device} -> {a.out}",
          file=sys.stderr, flush=True)
    argv = [*sys.argv[1:], "--device", a.device]
    lines, start = {}, time.perf_counter()
    for name in names:
        print(f"  {name} (timeout {timeouts[name]:g} s) ...", file=sys.stderr, flush=True)
        lines[name] = line = run_step(name, timeouts[name], argv)
        append(a.out, line)
        print(f"  {name}: {line['status']} in {line['seconds']:.0f} s  {brief(line)}", file=sys.stderr, flush=True)
    ours, theirs = (lines.get(n, {}).get("result", {}).get("tokens_per_sec") for n in ("mfu_adamw", "mfu_transformers"))
    summary = {"step": "summary", "seconds": round(time.perf_counter() - start, 1),
               "statuses": {n: line["status"] for n, line in lines.items()},
               "lmforge_adamw_over_transformers": round(ours / theirs, 3) if ours and theirs else None}
    append(a.out, summary)
    print(f"gpu_check: {summary}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
