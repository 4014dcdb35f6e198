"""GPU training throughput and MFU: GPT-2 124M shapes (12 layers, width 768, 12 heads, vocabulary
50304, context 1024), bf16 autocast with fp32 master weights, torch.compile, fused AdamW, the fused
output-layer loss: the training step `lmforge pretrain` takes. The batch is the largest that fits
(doubling until out of memory, found eagerly, so compiled it fits too) unless --batch-size is given.

MFU = training FLOPs per token (6 per weight + attention, `models.config.flops_per_token`)
x tokens/s / the device's dense bf16 peak (`core.runtime.BF16_PEAKS`, or --peak-tflops).

    python benchmarks/gpu_mfu.py                       # on a CUDA GPU
    python benchmarks/gpu_mfu.py --device cpu --n-layer 2 --n-embd 64 --n-head 2 --context 64 \\
        --vocab 512 --batch-size 4 --steps 3 --no-compile --peak-tflops 1   # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmforge.core.runtime import autocast, peak_flops
from lmforge.models.config import ModelConfig, flops_per_token
from lmforge.models.sizing import arch_config
from lmforge.models.transformer import Transformer
from lmforge.training.config import TrainConfig
from lmforge.training.optim import make_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, optimizer, device: torch.device, compile_: bool):
    fwd = torch.compile(model) if compile_ else model

    def step(x: torch.Tensor) -> float:
        with autocast(device):
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def fits(cfg: ModelConfig, batch: int, device: torch.device, optimizer_name: str) -> bool:
    """One eager training step at this batch size without running out of memory."""
    model = Transformer(cfg).to(device)
    optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer_name), 1e-4, device)
    try:
        make_step(model, optimizer, device, False)(torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1),
                                                                 device=device))
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(cfg: ModelConfig, device: torch.device, optimizer_name: str, limit: int) -> int:
    batch = 1
    while batch * 2 <= limit and fits(cfg, batch * 2, device, optimizer_name):
        batch *= 2
    return batch


def time_steps(step, x: torch.Tensor, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(tokens/s over `steps` timed steps after `warmup` untimed ones, the last step's loss)."""
    for _ in range(warmup):
        step(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step(x)
    sync(device)
    return x.shape[0] * (x.shape[1] - 1) * steps / (time.perf_counter() - t), float(loss)


def measure(cfg: ModelConfig, device: torch.device, optimizer_name: str = "adamw", batch: int | None = None,
            max_batch: int = 128, steps: int = 20, warmup: int = 5, compile_: bool = True,
            peak_tflops: float | None = None) -> dict:
    """Train `cfg` on random tokens and time it: batch, tokens/s, FLOPs/token, MFU (None where the
    peak is unknown), the last loss, and the parameter count."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = batch or largest_batch(cfg, device, optimizer_name, max_batch)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer_name), 1e-4, device)
    step = make_step(model, optimizer, device, compile_)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device=device)
    tokens_per_sec, loss = time_steps(step, x, device, steps, warmup)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device)
    flops = flops_per_token(cfg)
    mfu = flops * tokens_per_sec / peak if peak else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "batch": batch, "tokens_per_sec": round(tokens_per_sec, 1), "flops_per_token": flops,
            "mfu": mfu and round(mfu, 4), "loss": round(loss, 4), "params": model.num_params(), "peak_flops": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: the largest power of 2 that fits")
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: known "
                    "GPUs' datasheet figure)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = arch_config(args.arch, args.vocab, args.context, args.n_layer, args.n_embd, args.n_head)
    r = measure(cfg, device, args.optimizer, args.batch_size, args.max_batch, args.steps, args.warmup, args.compile,
                args.peak_tflops)
    mfu, peak, flops = r["mfu"], r["peak_flops"], r["flops_per_token"]
    print(f"device: {r['device']}; torch {torch.__version__}; {args.arch} {cfg.n_layer}x{cfg.n_embd}, "
          f"{r['params'] / 1e6:.1f}M parameters, context {cfg.context_length}, batch {r['batch']}, "
          f"{'compiled' if args.compile else 'eager'}, {args.optimizer}")
    print(f"tokens/s: {r['tokens_per_sec']:,.0f}; {flops / 1e9:.3f} GFLOP/token; "
          + (f"MFU: {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 dense" if mfu is not None
             else "MFU: n/a (no known bf16 peak for this device: pass --peak-tflops)"))
    print(json.dumps({k: r[k] for k in ("device", "batch", "tokens_per_sec", "flops_per_token", "mfu", "loss")}))


if __name__ == "__main__":
    main()
