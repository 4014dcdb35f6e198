"""Training throughput: lmforge vs transformers' GPT2LMHeadModel, same architecture, same run.

GPT-2 layout (6 layers, width 384, 6 heads, GPT-2's gelu_new unless --activation says otherwise,
learned positions, tied embeddings),
context 256, batch 8, vocabulary 8192, fp32, AdamW (fused where available) for both, dropout 0.
Each timing round runs both models back to back, so machine noise hits both alike; the
reported figure is the median over rounds.

    python benchmarks/train_throughput.py [--steps 5] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from lmforge.formats.hf import config_from_hf
from lmforge.models.transformer import Transformer

V, T, B, LAYERS, WIDTH, HEADS = 8192, 256, 8, 6, 384, 6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--activation", default="gelu_new", choices=["gelu_new", "gelu_pytorch_tanh", "gelu"],
                    help="GPT-2's own gelu_new by default; the others use PyTorch's fused kernels on both sides")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        activation_function=args.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(hf_cfg).to(device).train()
    ours = Transformer(config_from_hf(hf_cfg.to_dict())).to(device).train()  # identical architecture
    assert abs(hf.num_parameters() - ours.num_params()) == 0, (hf.num_parameters(), ours.num_params())
    x = torch.randint(0, V, (B, T + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def hf_step(opt):
        with amp:
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # shifts labels internally
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def our_step(opt):
        with amp:
            loss = ours(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {"transformers": (hf, hf_step), "lmforge": (ours, our_step)}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
            for name, (m, _) in runs.items()}
    for name, (_, step) in runs.items():  # warm-up
        for _ in range(2):
            step(opts[name])
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, step) in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(opts[name])
            sync(device)
            rates[name].append(B * T * args.steps / (time.perf_counter() - t))
    hf_rate, our_rate = statistics.median(rates["transformers"]), statistics.median(rates["lmforge"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); torch {torch.__version__}")
    print(f"GPT-2 {LAYERS}x{WIDTH}, {HEADS} heads, {args.activation}, context {T}, batch {B}, vocab {V}, "
          f"{ours.num_params() / 1e6:.1f}M params, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"transformers GPT2LMHeadModel: {hf_rate:10,.0f} tokens/s")
    print(f"lmforge Transformer:          {our_rate:10,.0f} tokens/s")
    print(f"ratio lmforge / transformers: {our_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
