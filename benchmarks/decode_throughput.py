"""Decode throughput at batch 1: lmforge (fp32, int8, int4) vs transformers vs llama.cpp, same weights.

GPT-2 124M shapes (12 layers, width 768, 12 heads, vocabulary 50257 unpadded on both sides,
context 1024), random weights, greedy decoding of --new-tokens tokens from a 16-token random
prompt (the time includes the prompt's prefill on every side). The transformers model is built from
a GPT2Config with random init and its weights are loaded into lmforge through `lmforge.formats.hf`
(the same path `lmforge import` takes), so both compute the same function; the script checks
that both emit the same greedy tokens.

Sides, timed back to back in each round (the median over rounds is reported):
  transformers    GPT2LMHeadModel.generate (KV cache), fp32
  lmforge fp32    the batching engine with one slot (`Engine(model, slots=1)`, the path
                  `generate_text` and `lmforge serve` use)
  lmforge int8    the same after `quantize_model` (what `--quantize int8` does)
  llama.cpp       llama-cpp-python on GGUF files lmforge writes from the same weights (f32, f16,
                  q8_0), n_threads = --threads, its default f16 KV cache; skipped if not installed
  4-bit, one file for both sides: llama.cpp's own quantizer makes Q4_0 and Q4_K_M from lmforge's f32
  file; "lmforge int4 Q4_0" loads that file with `lmforge.load` (quantize="auto": the Q4 matrices as
  int4, the Q6_K tied embedding/output as int8) and "llama.cpp Q4_0" runs it

Also printed: the fraction of the memory-bandwidth roofline, i.e. bytes of weight matrices read per
token x tokens/s / measured copy bandwidth.

    python benchmarks/decode_throughput.py [--new-tokens 128] [--rounds 3] [--threads 2] [--llama-threads N]
        [--only 'lmforge fp32,llama.cpp f32']
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from lmforge.formats.gguf import write_gguf
from lmforge.formats.hf import DictSource, config_from_hf, weights_from_hf
from lmforge.formats.modeldir import build_model, model_config_json
from lmforge.inference.engine import Engine, Request
from lmforge.models.quant import quantize_model
from lmforge.text.tokenizer import SPECIAL_TOKENS, Tokenizer

V, CTX, LAYERS, WIDTH, HEADS, PROMPT = 50257, 1024, 12, 768, 12, 16
BYTES_PER_WEIGHT = {"transformers": 4, "lmforge fp32": 4, "lmforge int8": 1, "llama.cpp f32": 4,
                    "llama.cpp f16": 2, "llama.cpp q8_0": 34 / 32,  # q8_0: 32 int8 + one f16 scale per block
                    "llama.cpp q8_0 1 thread": 34 / 32, "lmforge fp32 1 thread": 4, "lmforge int8 1 thread": 1}
# 4-bit files: the matrices' own bits (Q4_0 18 bytes / 32; Q4_K_M mostly Q4_K, 144 / 256, some Q6_K) and, on
# lmforge's side, int4 groups of 32 (16 bytes + a bf16 scale and zero per group) and int8 for the Q6_K parts
for _q, _llama, _ours in (("Q4_0", 18 / 32, 0.5 + 4 / 32), ("Q4_K_M", 0.6, 0.7)):
    for _t in ("", " 1 thread"):
        BYTES_PER_WEIGHT.update({f"llama.cpp {_q}{_t}": _llama, f"lmforge int4 {_q}{_t}": _ours})


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


def llama_cpp_sides(model, tmp: Path, prompt: list[int], n: int, threads: int) -> dict:
    """One timed function per GGUF type, running llama.cpp on a file lmforge writes (and q8_0 on one
    thread too: on a shared VM, llama.cpp's spinning thread pool can lose more than it gains)."""
    import llama_cpp

    # The GGUF needs a tokenizer: a tiny byte-level BPE one (token ids are fed directly; the
    # rest of the 50257 rows are listed as unused padding tokens).
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 4, 300, show_progress=False)
    assert tok.vocab_size >= len(SPECIAL_TOKENS)
    meta = model_config_json(model, tok)
    sides = {}
    runs = [("f32", threads), ("f16", threads), ("q8_0", threads)] + ([("q8_0", 1)] if threads > 1 else [])
    for outtype, k in runs:
        path = tmp / f"gpt2-124m.{outtype}.gguf"
        if not path.exists():
            write_gguf(model, tok, meta, path, outtype)
        llm = llama_cpp.Llama(str(path), n_ctx=max(256, len(prompt) + n), n_threads=k, n_threads_batch=k,
                              verbose=False)

        def run(llm=llm) -> list[int]:
            out = []
            for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                out.append(t)
                if len(out) == n:
                    return out
            return out

        sides[f"llama.cpp {outtype}" + (" 1 thread" if k != threads else "")] = run
    return sides


MEMORY: dict[str, tuple[int, int]] = {}  # file type -> (lmforge's weight bytes, llama.cpp's model size)


def four_bit_sides(tmp: Path, prompt: list[int], n: int, threads: int, llama_threads: int, on) -> dict:
    """lmforge int4 and llama.cpp on the same Q4_0 and Q4_K_M files, made by llama.cpp's quantizer."""
    import ctypes

    import llama_cpp

    from lmforge.formats.load import load_model

    sides = {}
    for qtype in ("Q4_0", "Q4_K_M"):
        path = tmp / f"gpt2-124m.{qtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        assert llama_cpp.llama_model_quantize(str(tmp / "gpt2-124m.f32.gguf").encode(), str(path).encode(),
                                              ctypes.byref(params)) == 0
        model = load_model(path, device="cpu").model
        engine = Engine(model, slots=1, max_len=PROMPT + n)
        sides[f"lmforge int4 {qtype}"] = on(engine)
        llm = llama_cpp.Llama(str(path), n_ctx=max(256, len(prompt) + n), n_threads=llama_threads,
                              n_threads_batch=llama_threads, verbose=False)
        ours = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        MEMORY[qtype] = (ours, llama_cpp.llama_model_size(llm._model.model))
        sides[f"llama.cpp {qtype}"] = lambda llm=llm: list(_take(llm, prompt, n))
        if threads > 1:
            sides[f"lmforge int4 {qtype} 1 thread"] = on(engine, 1)
            llm1 = llama_cpp.Llama(str(path), n_ctx=max(256, len(prompt) + n), n_threads=1, n_threads_batch=1,
                                   verbose=False)
            sides[f"llama.cpp {qtype} 1 thread"] = lambda llm=llm1: list(_take(llm, prompt, n))
    return sides


def _take(llm, prompt: list[int], n: int):
    for i, t in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        yield t
        if i + 1 == n:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-threads", type=int, default=None, help="llama.cpp's n_threads (default: --threads)")
    ap.add_argument("--only", help="comma-separated sides to time besides transformers (the reference), "
                                   "e.g. 'lmforge fp32,llama.cpp f32'")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    load_before = os.getloadavg()[0]  # other work on a shared VM
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.new_tokens

    hf_cfg = GPT2Config(vocab_size=V, n_positions=CTX, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = config_from_hf(hf_cfg.to_dict())
    tensors = dict(weights_from_hf(cfg, "gpt2", DictSource(hf.state_dict())))
    ours = build_model(cfg, tensors, "transformers' random weights").eval().for_inference()  # as load_model does
    n_params = ours.num_params()
    assert n_params == hf.num_parameters(), (n_params, hf.num_parameters())
    matrix_params = n_params - ours.wpe.weight.numel()  # per token: every matrix, one position row
    engine = Engine(ours, slots=1, max_len=PROMPT + N)
    engine8 = Engine(quantize_model(copy.deepcopy(ours)), slots=1, max_len=PROMPT + N)
    prompt = torch.randint(0, V - 1, (1, PROMPT))
    gen_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0,
                  use_cache=True)
    hf.generation_config.eos_token_id = None  # random weights: never stop early

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **gen_kw)
        return out[0, PROMPT:].tolist()

    def on(engine, threads: int = args.threads):
        def run() -> list[int]:
            torch.set_num_threads(threads)
            try:
                [[sample]] = engine.generate([Request(prompt[0].tolist(), max_tokens=N, temperature=0)])
            finally:
                torch.set_num_threads(args.threads)
            return sample.tokens
        return run

    sides = {"transformers": run_hf, "lmforge fp32": on(engine), "lmforge int8": on(engine8)}
    if args.threads > 1:  # also on one thread: a shared VM's other work stalls thread pools (see BENCHMARKS.md)
        sides.update({"lmforge fp32 1 thread": on(engine, 1), "lmforge int8 1 thread": on(engine8, 1)})
    tmp = tempfile.TemporaryDirectory()
    if importlib.util.find_spec("llama_cpp") is not None:
        llama_threads = args.llama_threads or args.threads
        sides.update(llama_cpp_sides(ours, Path(tmp.name), prompt[0].tolist(), N, llama_threads))
        sides.update(four_bit_sides(Path(tmp.name), prompt[0].tolist(), N, args.threads, llama_threads, on))
    if args.only:
        keep = {"transformers", *(name.strip() for name in args.only.split(","))}
        sides = {name: fn for name, fn in sides.items() if name in keep}
    outs = {name: fn() for name, fn in sides.items()}  # warm-up, and the correctness check
    ref = outs["transformers"]
    for name, got in outs.items():
        agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        print(f"greedy tokens, {name} vs transformers: "
              f"{'identical' if got == ref else f'agree for the first {agree} of {len(got)}'}")

    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            got = fn()
            rates[name].append(len(got) / (time.perf_counter() - t))
    tmp.cleanup()
    bw = copy_bandwidth()
    med = {name: statistics.median(r) for name, r in rates.items()}

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"llama.cpp threads {args.llama_threads or args.threads}; load average before/after: "
          f"{load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"model: GPT-2 124M shapes, {n_params / 1e6:.1f}M params, prompt {PROMPT}, {N} new tokens, greedy")
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (256 MB tensor copy, read + write)")
    for name in sides:
        runs = ", ".join(f"{r:.1f}" for r in rates[name])
        per_token = matrix_params * BYTES_PER_WEIGHT[name]
        print(f"{name:>24}: {med[name]:6.1f} tok/s (median; runs: {runs});  roofline: "
              f"{per_token / 1e6:.0f} MB/token = {per_token * med[name] / 1e9:.1f} GB/s = "
              f"{per_token * med[name] / bw:.0%} of copy bandwidth")

    def ratio(a: str, b: str) -> None:
        if a in rates and b in rates:
            per_round = [x / y for x, y in zip(rates[a], rates[b])]
            print(f"ratio {a} / {b}: {statistics.median(per_round):.2f}x "
                  f"(per round: {', '.join(f'{r:.2f}' for r in per_round)})")

    for qtype, (ours, theirs) in MEMORY.items():
        print(f"weights in memory, {qtype} file: lmforge {ours / 2**20:.0f} MiB (int4 groups of 32, int8 for Q6_K), "
              f"llama.cpp {theirs / 2**20:.0f} MiB; fp32 {n_params * 4 / 2**20:.0f} MiB")
    ratio("lmforge fp32", "transformers")
    ratio("lmforge int8", "lmforge fp32")
    ratio("lmforge fp32", "llama.cpp f32")
    ratio("lmforge int8", "llama.cpp q8_0")
    ratio("lmforge int8 1 thread", "lmforge fp32 1 thread")
    ratio("lmforge int8 1 thread", "llama.cpp q8_0 1 thread")
    for qtype in ("Q4_0", "Q4_K_M"):
        ratio(f"lmforge int4 {qtype}", f"llama.cpp {qtype}")
        ratio(f"lmforge int4 {qtype} 1 thread", f"llama.cpp {qtype} 1 thread")
        ratio(f"lmforge int4 {qtype}", "lmforge fp32")
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (llama-cpp-python is not installed: pip install 'lmforge[llamacpp]')")


if __name__ == "__main__":
    main()
