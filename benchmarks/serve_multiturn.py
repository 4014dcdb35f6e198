"""Multi-turn chat replay: time to first token per turn, `lmforge serve` with and without its prefix cache.

Builds a random model directory (GPT-2 layout; default 6 layers, width 384, context 1024; no
downloads) and starts two servers on it, one with the prefix cache (the default) and one with
--no-prefix-cache. Then, for each server, replays `--conversations` conversations of `--turns`
turns, all conversations sending turn t together (POST /v1/completions, greedy, `--max-tokens`
per answer); each turn resends the whole history (user messages of ~`--words` words and the
model's own answers), as a chat client does. Time to first token is timed as a one-token
request before each answer. The sides alternate round by round.

Reported: the median time to first token per turn for each side, their ratio, and the cache's hit
rate from the cached server's /metrics.

    python benchmarks/serve_multiturn.py [--conversations 8] [--turns 6] [--max-tokens 32] [--rounds 2]
        [--n-layer 6] [--n-embd 384] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from serve_throughput import WORDS, make_model_dir

from lmforge.core.runtime import cpu_name
from lmforge.serve.process import ServerProcess


async def turn_ttft(client, url: str, prompt: str, max_tokens: int, extra: dict | None = None) -> tuple[float, str]:
    """(time to the first token, the whole answer). The first token is timed as a request for one
    token (prefill and one step): a random model's first tokens are often special tokens that print
    nothing, which would make "the first text" a measure of luck. The answer is then asked for in
    full (untimed), as a chat client would. `extra`: fields another server needs (llama.cpp's ignore_eos)."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, **(extra or {})}
    t0 = time.perf_counter()
    (await client.post(url + "/v1/completions", json=body, timeout=600)).raise_for_status()
    ttft = time.perf_counter() - t0
    r = await client.post(url + "/v1/completions", json={**body, "max_tokens": max_tokens}, timeout=600)
    r.raise_for_status()
    return ttft, r.json()["choices"][0]["text"]


async def replay(url: str, conversations: int, turns: int, words: int, max_tokens: int, seed: int = 0,
                 extra: dict | None = None) -> list[list[float]]:
    """TTFT per turn (a list per turn, one per conversation). Each `seed` makes other conversations:
    a round that replayed the last one's would find even its first turn cached."""
    import httpx

    rng = random.Random(seed)
    history = [""] * conversations
    out = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conversations)) as client:
        for _ in range(turns):
            for c in range(conversations):
                history[c] += "User: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\nAssistant:"
            results = await asyncio.gather(*(turn_ttft(client, url, h, max_tokens, extra) for h in history))
            out.append([t for t, _ in results])
            for c, (_, answer) in enumerate(results):
                history[c] += answer + "\n"
    return out


def metric(url: str, name: str) -> float | None:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "chat"
        make_model_dir(model_dir, a.n_layer, a.n_embd, context_length=1024)
        common = ("--device", a.device, "--slots", str(a.conversations))
        servers = {"cache": ServerProcess(model_dir, *common), "no cache": ServerProcess(model_dir, *common,
                                                                                         "--no-prefix-cache")}
        try:
            per_turn: dict[str, list[list[float]]] = {side: [[] for _ in range(a.turns)] for side in servers}
            for r in range(a.rounds):
                for side, server in servers.items():
                    for t, ttfts in enumerate(asyncio.run(replay(server.url, a.conversations, a.turns, a.words,
                                                                 a.max_tokens, seed=r))):
                        per_turn[side][t].extend(ttfts)
            hit_rate = metric(servers["cache"].url, "lmforge_prefix_cache_hit_rate")
        finally:
            for server in servers.values():
                server.close()
    print(f"{cpu_name()}; {a.n_layer} layers x {a.n_embd}, {a.conversations} conversations x {a.turns} turns, "
          f"answers of {a.max_tokens} tokens, {a.rounds} rounds")
    print(f"{'turn':>4} {'TTFT p50 cache':>15} {'no cache':>10} {'ratio':>7}")
    for t in range(a.turns):
        on, off = statistics.median(per_turn["cache"][t]), statistics.median(per_turn["no cache"][t])
        print(f"{t + 1:>4} {on * 1000:>12.0f} ms {off * 1000:>7.0f} ms {off / on:>6.2f}x")
    print(f"prefix cache hit rate (of prompt tokens): {hit_rate}")


if __name__ == "__main__":
    main()
