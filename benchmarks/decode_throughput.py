"""Decode throughput at batch 1: lmforge vs transformers' GPT2LMHeadModel.generate, same weights.

GPT-2 124M shapes (12 layers, width 768, 12 heads, vocabulary 50257 unpadded on both sides,
context 1024), random weights, fp32, greedy decoding of --new-tokens tokens from a 16-token random
prompt. The transformers model is built from a GPT2Config with random init and its weights are
loaded into lmforge through `lmforge.formats.hf` (the same path `lmforge import` takes), so both
sides compute the same function; the script checks that both emit the same greedy tokens.

lmforge runs its batching engine (`Engine(model, slots=1)`, the path `generate_text` and
`lmforge serve` use) synchronously. Each round times both sides back to back; the median over
rounds is reported. Also printed: the fraction of the memory-bandwidth roofline, i.e. bytes of
weights read per token (fp32 params x 4) x tokens/s / measured copy bandwidth.

The llama.cpp row (llama-cpp-python on an f32 GGUF of the same weights) is skipped: lmforge cannot
write GGUF yet.

    python benchmarks/decode_throughput.py [--new-tokens 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from lmforge.formats.hf import DictSource, config_from_hf, weights_from_hf
from lmforge.formats.modeldir import build_model
from lmforge.inference.engine import Engine, Request

V, CTX, LAYERS, WIDTH, HEADS, PROMPT = 50257, 1024, 12, 768, 12, 16


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of `reps`."""
    n = mb * 2**20 // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.new_tokens

    hf_cfg = GPT2Config(vocab_size=V, n_positions=CTX, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = config_from_hf(hf_cfg.to_dict())
    tensors = dict(weights_from_hf(cfg, "gpt2", DictSource(hf.state_dict())))
    ours = build_model(cfg, tensors, "transformers' random weights").eval().decode_layout()  # as load_model does
    n_params = ours.num_params()
    assert n_params == hf.num_parameters(), (n_params, hf.num_parameters())
    engine = Engine(ours, slots=1, max_len=PROMPT + N)
    prompt = torch.randint(0, V - 1, (1, PROMPT))
    gen_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0,
                  use_cache=True)
    hf.generation_config.eos_token_id = None  # random weights: never stop early

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **gen_kw)
        return out[0, PROMPT:].tolist()

    def run_ours() -> list[int]:
        [[sample]] = engine.generate([Request(prompt[0].tolist(), max_tokens=N, temperature=0)])
        return sample.tokens

    sides = {"transformers": run_hf, "lmforge": run_ours}
    outs = {name: fn() for name, fn in sides.items()}  # warm-up, and the correctness check
    same = outs["transformers"] == outs["lmforge"]
    agree = next((i for i, (a, b) in enumerate(zip(outs["transformers"], outs["lmforge"])) if a != b), N)
    print(f"greedy tokens: {'identical' if same else f'DIFFER from token {agree}'} "
          f"({len(outs['lmforge'])} vs {len(outs['transformers'])} tokens)")

    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            got = fn()
            rates[name].append(len(got) / (time.perf_counter() - t))
    bw = copy_bandwidth()
    med = {name: statistics.median(r) for name, r in rates.items()}
    ratios = [o / h for o, h in zip(rates["lmforge"], rates["transformers"])]

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: GPT-2 124M shapes, {n_params / 1e6:.1f}M params fp32, prompt {PROMPT}, {N} new tokens, greedy")
    for name in sides:
        runs = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"{name:>13}: {med[name]:6.1f} tok/s (median; runs: {runs})")
    print(f"        ratio: {statistics.median(ratios):.2f}x lmforge/transformers "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    if importlib.util.find_spec("llama_cpp") is None:
        print("    llama.cpp: skipped (llama-cpp-python is not installed, and lmforge cannot write GGUF yet)")
    else:
        print("    llama.cpp: skipped (lmforge cannot write GGUF yet, so there is no GGUF of the same weights)")
    per_token = n_params * 4
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (256 MB tensor copy, read + write)")
    for name in sides:
        print(f"roofline {name:>12}: {per_token / 1e6:.0f} MB weights/token x {med[name]:.1f} tok/s = "
              f"{per_token * med[name] / 1e9:.1f} GB/s = {per_token * med[name] / bw:.0%} of copy bandwidth")


if __name__ == "__main__":
    main()
