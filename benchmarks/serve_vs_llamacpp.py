"""`lmforge serve` against llama.cpp's `llama-server`: the same f32 weights, the same requests, one client.

The model: GPT-2 124M shapes (12 layers x 768, 12 heads, context 1,024, a 50,257-token byte-level
BPE tokenizer trained here on generated text), random weights; no downloads. lmforge serves its
model directory; llama-server the f32 GGUF file `lmforge export --format gguf --outtype f32`
writes from it. Tokens that print nothing on their own (special tokens, lone bytes) have zeroed
embedding rows, so greedy decoding never picks them: end-of-text cannot end lmforge's streams
early (llama-server gets `ignore_eos: true` too), every token streams text, and every request is
checked to have generated exactly --tokens tokens on both sides.

llama-server is built from the llama-cpp-python sdist for this CPU on first use (benchmarks/
llama_server.py; ~15 min on 2 cores, then cached). Both servers get --streams slots (llama-server:
-np, continuous batching, a context of --streams x 1,024 so each slot holds a whole context) and
--threads threads (lmforge through OMP_NUM_THREADS).

1. Throughput: --streams concurrent streaming POST /v1/completions, distinct prompts of ~64
   words (new ones each round, so no prefix cache helps), greedy, --tokens tokens each, from one
   asyncio client (httpx). Per side: aggregate tokens/s (all tokens / wall time), time to first
   token (TTFT) and inter-token latency (ITL: gaps between streamed chunks) p50/p95. The sides
   alternate round by round; the median round is reported, and the ratio lmforge/llama.cpp.
2. Multi-turn chat (benchmarks/serve_multiturn.py's replay): --conversations conversations of
   --turns turns, the whole history resent each turn, TTFT per turn for lmforge with its prefix
   cache, lmforge with --no-prefix-cache and llama-server with its prompt cache (cache_prompt).

Goals (pass/fail): throughput >= 1.0x llama-server; TTFT p50 under --streams streams <= 2x
llama-server's; last-turn TTFT with the prefix cache >= 3x lower than without.

    python benchmarks/serve_vs_llamacpp.py [--rounds 3] [--streams 16] [--tokens 128] [--threads N]
        [--conversations 8] [--turns 6] [--no-llama] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_multiturn import replay
from serve_throughput import WORDS, make_model_dir, pct, stream_timed

from lmforge.core.runtime import cpu_name
from lmforge.serve.process import ServerProcess

GPT2 = {"n_layer": 12, "n_embd": 768, "vocab_size": 50257, "context_length": 1024}
SMALL = {"n_layer": 2, "n_embd": 128, "vocab_size": 512, "context_length": 512}  # --quick
PROMPT_WORDS = 64
# What llama-server needs to match lmforge's requests: never stop at end-of-text (lmforge's model
# never picks it), and its prompt cache on (its default, said explicitly).
LLAMA_EXTRA = {"ignore_eos": True, "cache_prompt": True}


def prompts(round_: int, n: int) -> list[str]:
    """`n` prompts of PROMPT_WORDS words, different in each round and from their first words on."""
    rng = random.Random(round_)
    return [" ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS)) for _ in range(n)]


async def one_round(url: str, texts: list[str], tokens: int, extra: dict) -> dict:
    """All streams at once; per request TTFT, chunk gaps and token counts, and tokens/s overall."""
    import httpx

    body = {"max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **extra}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(texts))) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_timed(client, url, {**body, "prompt": p}) for p in texts))
        wall = time.perf_counter() - t0
    made = [u["completion_tokens"] for _, u in results]
    if any(n != tokens for n in made):
        raise RuntimeError(f"{url}: asked for {tokens} tokens per stream, got {made}: the sides would not compare")
    return {"tok_s": sum(made) / wall, "wall_s": wall, "ttft": [ts[0] for ts, _ in results],
            "itl": [b - a for ts, _ in results for a, b in zip(ts, ts[1:])],
            "chunks": [len(ts) for ts, _ in results], "prompt_tokens": [u["prompt_tokens"] for _, u in results]}


def throughput(servers: dict[str, tuple[ServerProcess, dict]], a: argparse.Namespace) -> dict[str, list[dict]]:
    """Rounds of --streams concurrent streams, the sides taking turns within each round."""
    for server, extra in servers.values():  # warm-up at full width: first-call allocations, batch-16 buffers
        asyncio.run(one_round(server.url, prompts(-1, a.streams), 4, extra))
    out: dict[str, list[dict]] = {side: [] for side in servers}
    for r in range(a.rounds):
        texts = prompts(r, a.streams)
        for side, (server, extra) in servers.items():
            out[side].append(asyncio.run(one_round(server.url, texts, a.tokens, extra)))
            res = out[side][-1]
            print(f"  round {r + 1} {side:>9}: {res['tok_s']:6.1f} tok/s, TTFT p50 "
                  f"{pct(res['ttft'], 0.5) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return out


def multiturn(servers: dict[str, tuple[ServerProcess, dict]], a: argparse.Namespace) -> dict[str, list[list[float]]]:
    """TTFT per turn (all conversations, all rounds) per side; each round replays new conversations."""
    out: dict[str, list[list[float]]] = {side: [[] for _ in range(a.turns)] for side in servers}
    for r in range(a.rounds):
        for side, (server, extra) in servers.items():
            t0 = time.perf_counter()
            turns = asyncio.run(replay(server.url, a.conversations, a.turns, a.turn_words, a.answer_tokens,
                                       seed=1000 + r, extra=extra))
            for t, ttfts in enumerate(turns):
                out[side][t].extend(ttfts)
            print(f"  round {r + 1} {side:>17}: last turn TTFT p50 {statistics.median(turns[-1]) * 1e3:.0f} ms "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def export_gguf(model_dir: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", "export", str(model_dir), "--format", "gguf", "--outtype", "f32",
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)


def goal(name: str, value: float, target: str, ok: bool) -> dict:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.2f}x (goal {target})")
    return {"goal": name, "value": round(value, 3), "target": target, "pass": ok}


def report(tp: dict[str, list[dict]], mt: dict[str, list[list[float]]], a: argparse.Namespace) -> list[dict]:
    """Print both sides' figures and the ratios; return the goals."""
    goals = []
    print(f"\n{a.streams} concurrent streams, {a.tokens} greedy tokens each, prompts of ~{PROMPT_WORDS} words "
          f"(~{statistics.median(tp['lmforge'][0]['prompt_tokens']):.0f} tokens), {a.rounds} rounds")
    print(f"{'side':>9} {'tok/s':>7}  {'per round':<22} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>6}")
    rate = {}
    for side, rounds in tp.items():
        rate[side] = statistics.median(r["tok_s"] for r in rounds)
        ttft = [t for r in rounds for t in r["ttft"]]
        itl = [t for r in rounds for t in r["itl"]]
        per = ", ".join(f"{r['tok_s']:.1f}" for r in rounds)
        print(f"{side:>9} {rate[side]:7.1f}  {per:<22} {pct(ttft, 0.5) * 1e3:6.0f} ms {pct(ttft, 0.95) * 1e3:4.0f} ms "
              f"{pct(itl, 0.5) * 1e3:5.0f} ms {pct(itl, 0.95) * 1e3:3.0f} ms")
    for side, rounds in tp.items():  # what would make the figures mean less than they say
        if any(n < a.tokens for r in rounds for n in r["chunks"]):
            print(f"note: {side} sent some streams' tokens in fewer chunks than tokens: its ITL is per chunk")
    if "llama" in tp and [r["prompt_tokens"] for r in tp["lmforge"]] != [r["prompt_tokens"] for r in tp["llama"]]:
        print("note: the two servers tokenized the prompts into different numbers of tokens")
    if "llama" in tp:
        ratios = [f"{x['tok_s'] / y['tok_s']:.2f}" for x, y in zip(tp["lmforge"], tp["llama"])]
        ttft_p50 = {s: pct([t for r in tp[s] for t in r["ttft"]], 0.5) for s in tp}
        print(f"lmforge/llama.cpp: throughput {rate['lmforge'] / rate['llama']:.2f}x (per round {', '.join(ratios)}), "
              f"TTFT p50 {ttft_p50['lmforge'] / ttft_p50['llama']:.2f}x")
    print(f"\nmulti-turn: {a.conversations} conversations x {a.turns} turns (~{a.turn_words} words a turn, answers of "
          f"{a.answer_tokens} tokens), TTFT p50 per turn, {a.rounds} rounds")
    sides = list(mt)
    print(f"{'turn':>4} " + " ".join(f"{s:>17}" for s in sides) + f" {'no cache/cache':>15}")
    for t in range(a.turns):
        p50 = {s: statistics.median(mt[s][t]) for s in sides}
        print(f"{t + 1:>4} " + " ".join(f"{p50[s] * 1e3:14.0f} ms" for s in sides)
              + f" {p50['lmforge no cache'] / p50['lmforge cache']:14.2f}x")
    print("\ngoals" + (" (a --quick smoke run: not the goals' setting)" if a.quick else "") + ":")
    if "llama" in tp:
        goals.append(goal("throughput lmforge/llama.cpp", rate["lmforge"] / rate["llama"], ">= 1.0x",
                          rate["lmforge"] >= rate["llama"]))
        goals.append(goal(f"TTFT p50 under {a.streams} streams lmforge/llama.cpp", ttft_p50["lmforge"] /
                          ttft_p50["llama"], "<= 2.0x", ttft_p50["lmforge"] <= 2 * ttft_p50["llama"]))
    last = {s: statistics.median(mt[s][-1]) for s in sides}
    goals.append(goal(f"turn-{a.turns} TTFT without/with the prefix cache",
                      last["lmforge no cache"] / last["lmforge cache"], ">= 3.0x",
                      last["lmforge no cache"] >= 3 * last["lmforge cache"]))
    return goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help="rounds of each part (default 3; --quick 1)")
    ap.add_argument("--streams", type=int, help="concurrent streams and slots (default 16; --quick 4)")
    ap.add_argument("--tokens", type=int, help="tokens per stream (default 128; --quick 8)")
    ap.add_argument("--conversations", type=int, help="multi-turn conversations (default 8; --quick 2)")
    ap.add_argument("--turns", type=int, help="turns per conversation (default 6; --quick 3)")
    ap.add_argument("--turn-words", type=int, default=40, help="words of each user message")
    ap.add_argument("--answer-tokens", type=int, default=32, help="tokens of each multi-turn answer")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for each server")
    ap.add_argument("--no-llama", action="store_true", help="lmforge alone (no llama-server build or run)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, few streams and tokens: a smoke run")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write every figure to this JSON file")
    a = ap.parse_args()
    for name, full, quick in (("rounds", 3, 1), ("streams", 16, 4), ("tokens", 128, 8), ("conversations", 8, 2),
                              ("turns", 6, 3)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if a.conversations > a.streams:
        ap.error("--conversations may not exceed --streams (the servers' slots)")
    shape = SMALL if a.quick else GPT2
    exe = None
    if not a.no_llama:
        from llama_server import BuildError, build

        try:
            exe = build()
        except BuildError as e:
            sys.exit(f"llama-server could not be built, so there is nothing to compare against: {e}\n"
                     "(--no-llama runs lmforge alone)")
    t_start, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, gguf = Path(tmp) / "gpt2", Path(tmp) / "gpt2.f32.gguf"
        print(f"building the model: {shape}", file=sys.stderr, flush=True)
        make_model_dir(model_dir, shape["n_layer"], shape["n_embd"], shape["context_length"], shape["vocab_size"],
                       mute_silent=True)
        lmforge_args = ("--device", "cpu", "--slots", str(a.streams))
        env = {"OMP_NUM_THREADS": str(a.threads)}
        servers: dict[str, tuple[ServerProcess, dict]] = {}
        try:
            servers["lmforge"] = (ServerProcess(model_dir, *lmforge_args, env=env, timeout=300), {})
            if exe:
                export_gguf(model_dir, gguf)
                from llama_server import start

                servers["llama"] = (start(exe, gguf, a.streams, shape["context_length"], a.threads), LLAMA_EXTRA)
            print("throughput:", file=sys.stderr, flush=True)
            tp = throughput(servers, a)
            no_cache = ServerProcess(model_dir, *lmforge_args, "--no-prefix-cache", env=env, timeout=300)
            servers["lmforge no cache"] = (no_cache, {})  # closed with the rest
            asyncio.run(one_round(no_cache.url, prompts(-2, a.conversations), 4, {}))  # its warm-up
            mt_servers = {"lmforge cache": servers["lmforge"], "lmforge no cache": servers["lmforge no cache"]}
            if exe:
                mt_servers["llama"] = servers["llama"]
            print("multi-turn:", file=sys.stderr, flush=True)
            mt = multiturn(mt_servers, a)
        finally:
            for server, _ in servers.values():
                server.close()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, {a.threads} threads per server; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}; GPT-2 layout {shape['n_layer']} layers x {shape['n_embd']}, "
          f"vocabulary {shape['vocab_size']:,}, random f32 weights" + ("" if exe else "; llama-server: not run"))
    goals = report(tp, mt, a)
    print(f"\n{(time.time() - t_start) / 60:.1f} min")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                      "cpu": cpu_name(), "shape": shape, "load_before": load,
                                      "throughput": tp, "multiturn": mt, "goals": goals}, indent=1))
    if not all(g["pass"] for g in goals):
        sys.exit(1)  # as serve_soak.py: a failed goal is a failed run


if __name__ == "__main__":
    main()
