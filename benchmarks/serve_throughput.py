"""Serving throughput: 16 concurrent streaming clients vs the same 16 requests one at a time.

Builds a small random model directory in a temporary folder (GPT-2 layout, 4 layers, width 256,
4 heads, context 256, a BPE tokenizer trained here on generated text; no downloads), starts
`lmforge serve` on it as a subprocess on a free port with --slots 16, and sends 16 streaming
POST /v1/completions requests (max_tokens 64, temperature 0.8, one seed each,
`stream_options: {"include_usage": true}`):

- concurrent: all 16 at once from one asyncio client (the engine batches them);
- sequential: the same 16 requests one after the other, from the same client.

Reported: aggregate completion tokens/s (sum of usage.completion_tokens / wall time), the ratio
concurrent/sequential, and time to first token (first SSE chunk with text) p50/p95 for both.
Rounds alternate sequential and concurrent on the same server; the median over rounds is
reported, and the per-round ratios are printed.

    python benchmarks/serve_throughput.py [--clients 16] [--max-tokens 64] [--rounds 2]
        [--n-layer 4] [--n-embd 256] [--temperature 0.8] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.formats.modeldir import save_model_dir
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.serve.process import ServerProcess
from lmforge.text.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported where used: make_model_dir serves callers without httpx (benchmarks/gpu_check.py)
    import httpx

WORDS = ("the model reads a token and writes the next one while the server batches many requests "
         "into one matrix product so that each weight is read once for all of them and the cache "
         "keeps keys and values of earlier positions").split()


def make_model_dir(directory: Path, n_layer: int, n_embd: int, context_length: int = 256, vocab_size: int = 512,
                   mute_silent: bool = False) -> None:
    """A random GPT-2-layout model and a BPE tokenizer of `vocab_size` trained here on generated text.
    `mute_silent` zeroes the (tied) embedding rows of tokens that print nothing on their own (special
    tokens, lone bytes of a multi-byte character): their logit is then 0, below the largest of the
    others' random logits, so greedy decoding never picks them. End-of-text can then never end a
    stream early, and every token streams text."""
    rng = random.Random(0)
    # enough distinct words, each seen a few times, for BPE to find vocab_size merges
    n_words, n_docs = (300, 2000) if vocab_size <= 512 else (int(vocab_size * 1.4), vocab_size // 6)
    words = WORDS + ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9)))
                     for _ in range(n_words)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) for _ in range(n_docs)]
    tokenizer = Tokenizer.train(docs, vocab_size=vocab_size, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=n_layer,
                      n_head=max(1, n_embd // 64), n_embd=n_embd)
    model = Transformer(cfg).eval()
    if mute_silent:
        assert cfg.tie_embeddings
        silent = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) in ("", "\ufffd")
                  or i in tokenizer.special_ids]
        with torch.no_grad():
            model.wte.weight[silent] = 0
    save_model_dir(directory, model, tokenizer)


async def stream_timed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[list[float], dict]:
    """(seconds from sending to each chunk with text, the usage chunk) of one streamed completion."""
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(time.perf_counter() - t0)
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return times or [time.perf_counter() - t0], usage


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens from the usage chunk)."""
    times, usage = await stream_timed(client, url, body)
    return times[0], usage["completion_tokens"]


async def run_async(url: str, bodies: list[dict], concurrent: bool) -> tuple[float, list[float]]:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(bodies))) as client:
        t = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(stream_one(client, url, b) for b in bodies))
        else:
            results = [await stream_one(client, url, b) for b in bodies]
        wall = time.perf_counter() - t
    return sum(n for _, n in results) / wall, [t for t, _ in results]


def run(url: str, bodies: list[dict], concurrent: bool) -> tuple[float, list[float]]:
    """(aggregate completion tokens/s, per-request TTFT). One asyncio client drives every stream,
    as load generators do (vLLM's benchmark_serving): on a 2-core machine shared with the server,
    16 client threads would spend the cores fighting over the GIL."""
    return asyncio.run(run_async(url, bodies, concurrent))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench(clients: int = 16, max_tokens: int = 64, rounds: int = 2, n_layer: int = 4, n_embd: int = 256,
          temperature: float = 0.8, device: str = "cpu") -> dict[str, list[tuple[float, list[float]]]]:
    """Per mode (sequential, concurrent), one (completion tokens/s, TTFTs) per round."""
    prompts = ["the server batches", "each weight is read once", "keys and values of", "the model reads a"]
    bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": temperature,
               "seed": 1000 + i, "stream": True, "stream_options": {"include_usage": True}}
              for i in range(clients)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        make_model_dir(model_dir, n_layer, n_embd)
        server = ServerProcess(model_dir, "--device", device, "--slots", str(clients), "--max-queue",
                               str(4 * clients))
        try:
            run(server.url, bodies[:2], concurrent=True)  # warm-up
            res: dict[str, list[tuple[float, list[float]]]] = {"sequential": [], "concurrent": []}
            for _ in range(rounds):
                for mode in res:
                    res[mode].append(run(server.url, bodies, concurrent=mode == "concurrent"))
        finally:
            server.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda, auto)")
    args = ap.parse_args()
    res = bench(args.clients, args.max_tokens, args.rounds, args.n_layer, args.n_embd, args.temperature, args.device)
    rate = {m: statistics.median(r for r, _ in runs) for m, runs in res.items()}
    ttfts = {m: [t for _, ts in runs for t in ts] for m, runs in res.items()}
    ratios = [c[0] / s[0] for s, c in zip(res["sequential"], res["concurrent"])]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; model: {args.n_layer} layers, "
          f"width {args.n_embd}, random weights; server on {args.device}")
    print(f"{args.clients} streaming requests, max_tokens {args.max_tokens}, temperature {args.temperature}, "
          f"--slots {args.clients}")
    for m in res:
        runs = ", ".join(f"{r:.0f}" for r, _ in res[m])
        print(f"{m:>11}: {rate[m]:7.1f} completion tok/s (median; runs: {runs}); "
              f"TTFT p50 {pct(ttfts[m], 0.5) * 1e3:.0f} ms, p95 {pct(ttfts[m], 0.95) * 1e3:.0f} ms")
    print(f"      ratio: {statistics.median(ratios):.2f}x concurrent/sequential "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 4x)")


if __name__ == "__main__":
    main()
