"""Soak of `lmforge serve`: many clients, some of them misbehaving, for minutes; then the goals checked.

The load is one asyncio `httpx` client (no new dependency; each misbehaviour is exact): `--clients`
virtual clients, each sending one request after another until the time is up, drawn at random from
a mix: completions and chat completions, streamed and not, `n=2`, long prompts (half the context),
streams the client hangs up on after a few chunks, a slow reader (a pause before every SSE line),
and bad requests (invalid JSON, unknown fields, wrong types, over the context, a body over 1 MiB,
a text/plain body, an unknown path, a wrong method, bad chat messages). A 503 is honoured as the
OpenAI SDKs do: the client waits what `Retry-After` says (at most until the end) before its next
request. Every 30 s (`--rss-every`) the server's RSS (/proc/PID/status VmRSS) and its /metrics
gauges are sampled.

Goals (each pass/fail in the JSON; the exit code is 1 if one fails):
- no 5xx other than 503, and no error chunk inside a stream;
- every 503 carries `Retry-After` (whole seconds >= 1);
- every error body in OpenAI's shape, {"error": {"message", "type", "param", "code"}};
- every request answered as it should be: bad ones with their 4xx, good ones 200 (whole: every
  choice finished, streams with usage and [DONE]) or 503, no connection error or timeout;
- RSS after warm-up within +10%: no sample after the first one at `--warmup` s (default 60) above
  1.1x that one, the sample taken after the load included;
- active slots and queued requests back at 0 once the load stops (/metrics);
- the server's per-route, per-status reply counters (`lmforge_http_responses_total`) equal to what
  this client counted, its own /metrics scrapes included.

The server is `lmforge serve` started here as a subprocess (ServerProcess) on a random model made
on the fly (benchmarks/serve_throughput.py's: GPT-2 layout, 4 layers x 256, context 256) or on
`--model DIR`, with the machine's default --slots and --max-queue and `--cache-mb 16`. The prefix
cache grows until it reaches its bound, by design; a bound it reaches within the warm-up keeps
that growth out of the RSS goal (the default one, a quarter of free memory up to 4 GiB, would still
be filling at the end; its MiB are in every sample). A table goes to stderr, one JSON object with
every figure to stdout.

    python benchmarks/serve_soak.py [--clients 100] [--minutes 10] [--model DIR] [--rss-every 30]
        [--warmup 60] [--n-layer 4] [--n-embd 256] [--cache-mb 16] [--seed 0] [-- SERVE_ARGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve_throughput import WORDS, make_model_dir, pct

from lmforge.core.runtime import cpu_name
from lmforge.serve.process import ServerProcess

# The mix: kind -> weight. "bad" draws one of BAD; latency is reported for the kinds in TIMED.
MIX = {"complete": 18, "stream": 18, "chat": 8, "chat_stream": 8, "n2": 6, "n2_stream": 4, "long": 8,
       "disconnect": 8, "slow_reader": 4, "bad": 14}
TIMED = ("complete", "stream", "chat", "chat_stream", "n2", "n2_stream", "long")
ERROR_KEYS = {"message", "type", "param", "code"}
RSS_GROWTH = 1.10
MAX_BODY = 1 << 20  # the server's default --max-body, which the soak leaves as it is


@dataclass
class Outcome:
    kind: str
    path: str  # the route, as the server's counters label it
    status: int | str  # the HTTP status, or "transport: ExceptionName"
    seconds: float
    problems: list[str] = field(default_factory=list)  # "category: detail"
    retry_after: int = 0
    what: str = ""  # which bad request


def bad_requests(ctx: int) -> list[tuple[str, str, str, dict, int]]:
    """(name, method, path, httpx keyword arguments, the status it must get): requests a server must
    refuse, each in OpenAI's error shape."""
    js = {"Content-Type": "application/json"}
    return [
        ("invalid JSON", "POST", "/v1/completions", {"content": b'{"prompt": "the', "headers": js}, 400),
        ("unknown field", "POST", "/v1/completions", {"json": {"prompt": "the", "frobnicate": 1}}, 400),
        ("wrong type", "POST", "/v1/completions", {"json": {"prompt": "the", "temperature": "hot"}}, 400),
        ("n=0", "POST", "/v1/completions", {"json": {"prompt": "the", "n": 0}}, 400),
        ("max_tokens over the context", "POST", "/v1/completions", {"json": {"prompt": "the",
                                                                            "max_tokens": 10**6}}, 400),
        ("prompt over the context", "POST", "/v1/completions",
         {"json": {"prompt": "the " * (ctx + 10), "max_tokens": 4}}, 400),  # a token a word at least
        ("unknown model", "POST", "/v1/completions", {"json": {"prompt": "the", "model": "gpt-9"}}, 400),
        ("body over 1 MiB", "POST", "/v1/completions",
         {"content": b'{"prompt": "' + b"a" * MAX_BODY + b'"}', "headers": js}, 413),
        ("text/plain body", "POST", "/v1/completions",
         {"content": b'{"prompt": "the"}', "headers": {"Content-Type": "text/plain"}}, 415),
        ("unknown path", "POST", "other", {"json": {"prompt": "the"}}, 404),
        ("wrong method", "DELETE", "/v1/completions", {}, 405),
        ("messages not a list", "POST", "/v1/chat/completions", {"json": {"messages": "hello"}}, 400),
        ("unknown role", "POST", "/v1/chat/completions",
         {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 400),
    ]


def error_problems(r: httpx.Response, body: bytes) -> list[str]:
    """What is wrong with an error reply: its shape, and for a 503 its Retry-After."""
    out = []
    try:
        err = json.loads(body)["error"]
        if set(err) != ERROR_KEYS or not isinstance(err["message"], str) or not err["message"] \
                or not isinstance(err["type"], str):
            out.append(f"error shape: {body[:200]!r}")
    except (ValueError, KeyError, TypeError):
        out.append(f"error shape: {body[:200]!r}")
    if r.status_code == 503 and retry_after(r) < 1:
        out.append(f"503 without Retry-After: {r.headers.get('retry-after')!r}")
    if r.status_code >= 500 and r.status_code != 503:
        out.append(f"5xx: {r.status_code} {body[:200]!r}")
    return out


def retry_after(r: httpx.Response) -> int:
    value = r.headers.get("retry-after", "")
    return int(value) if value.isdigit() else 0


def answer_problems(body: dict, n: int, chat: bool) -> list[str]:
    """A non-streamed 200: n choices, each finished, and usage."""
    choices = body.get("choices") or []
    if sorted(c.get("index") for c in choices) != list(range(n)):
        return [f"incomplete answer: {len(choices)} choices, wanted {n}"]
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return ["incomplete answer: a choice without a finish_reason"]
    if any(not isinstance((c.get("message") or {}).get("content") if chat else c.get("text"), str) for c in choices):
        return ["incomplete answer: a choice without text"]
    return [] if isinstance(body.get("usage"), dict) else ["incomplete answer: no usage"]


def responses(metrics: dict[str, float]) -> dict[str, int]:
    """The server's reply counters, {"ROUTE STATUS": count}."""
    prefix, out = 'lmforge_http_responses_total{path="', {}
    for series, v in metrics.items():
        if series.startswith(prefix):
            path, status = series[len(prefix):-2].split('",status="')
            out[f"{path} {status}"] = int(v)
    return out


class Soak:
    """The load, the samples and the checks against one running server."""

    def __init__(self, url: str, pid: int | None, clients: int, seconds: float, rss_every: float = 30,
                 warmup: float = 60, seed: int = 0) -> None:
        self.url, self.pid, self.clients, self.seconds = url, pid, clients, seconds
        self.rss_every, self.warmup, self.seed = rss_every, warmup, seed
        self.outcomes: list[Outcome] = []
        self.sent: Counter[tuple[str, int | str]] = Counter()  # (route, status), as the server counts them
        self.samples: list[dict] = []
        self.t0, self.bad_sent = 0.0, 0

    # -- plumbing ----------------------------------------------------------------------------------
    def record(self, o: Outcome) -> Outcome:
        self.outcomes.append(o)
        self.sent[o.path, o.status] += 1
        return o

    async def scrape(self) -> dict[str, float]:
        """/metrics as {series: value} (series with their labels as written); the scrape is counted."""
        r = await self.client.get(self.url + "/metrics")
        self.sent["/metrics", r.status_code] += 1
        r.raise_for_status()
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def rss_mib(self) -> float | None:
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    async def sample(self, when: str = "") -> None:
        m = await self.scrape()
        self.samples.append({"t": round(time.monotonic() - self.t0, 1), "rss_mib": self.rss_mib(),
                             "active": m.get("lmforge_active_slots"), "queued": m.get("lmforge_queue_depth"),
                             "cache_mib": round(m.get("lmforge_prefix_cache_bytes", 0) / 2**20, 1),
                             "cancelled": m.get("lmforge_cancelled_total"),
                             "completion_tokens": m.get("lmforge_completion_tokens_total"), "when": when})

    # -- one request of each kind -------------------------------------------------------------------
    def body(self, rng: random.Random, kind: str) -> tuple[str, dict, int]:
        """(route, body, n) of a good request of `kind`."""
        chat = kind.startswith("chat")
        words = self.long_words if kind == "long" else rng.randint(1, self.short_words)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        n = 2 if kind.startswith("n2") else 1
        stream = kind in ("stream", "chat_stream", "n2_stream", "disconnect", "slow_reader")
        most = max(1, self.ctx // 8)
        b: dict = {"max_tokens": rng.randint(min(8, most), min(32, most)) if kind != "disconnect" else self.ctx // 4,
                   "temperature": rng.choice([0, 0.8, 1.0]), "seed": rng.randrange(1 << 30), "n": n}
        if stream:
            b |= {"stream": True, "stream_options": {"include_usage": True}}
        if chat:
            return "/v1/chat/completions", b | {"messages": [{"role": "user", "content": text}]}, n
        return "/v1/completions", b | {"prompt": text}, n

    async def good(self, rng: random.Random, kind: str) -> Outcome:
        path, body, n = self.body(rng, kind)
        chat = path == "/v1/chat/completions"
        t = time.monotonic()
        if not body.get("stream"):
            r = await self.client.post(self.url + path, json=body)
            problems = error_problems(r, r.content) if r.status_code != 200 else answer_problems(r.json(), n, chat)
            if r.status_code not in (200, 503):
                problems.append(f"unexpected status: {r.status_code} for a good request")
            return Outcome(kind, path, r.status_code, time.monotonic() - t, problems, retry_after(r))
        async with self.client.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                problems = error_problems(r, await r.aread())
                if r.status_code != 503:
                    problems.append(f"unexpected status: {r.status_code} for a good request")
                return Outcome(kind, path, r.status_code, time.monotonic() - t, problems, retry_after(r))
            hang_up = rng.randint(1, 4) if kind == "disconnect" else None
            finished, usage, done, chunks, problems = set(), False, False, 0, []
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if kind == "slow_reader":
                    await asyncio.sleep(rng.uniform(0.05, 0.2))
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if "error" in chunk:
                    problems.append(f"error chunk: {line[:200]}")
                usage = usage or isinstance(chunk.get("usage"), dict)
                finished |= {c["index"] for c in chunk.get("choices") or [] if c.get("finish_reason")}
                if hang_up is not None and chunks >= hang_up:
                    break  # leaving the block closes the connection mid-stream
            if hang_up is None and not (done and usage and finished == set(range(n))):
                problems.append("incomplete answer: a stream ended before its choices, usage and [DONE]")
        return Outcome(kind, path, 200, time.monotonic() - t, problems)

    async def bad(self) -> Outcome:
        """The next of the bad requests, in turn across all clients: a short run sends each of them."""
        name, method, path, kwargs, want = self.bad_requests[self.bad_sent % len(self.bad_requests)]
        self.bad_sent += 1
        t = time.monotonic()
        r = await self.client.request(method, self.url + ("/v1/nothing-here" if path == "other" else path), **kwargs)
        problems = error_problems(r, r.content)
        if r.status_code != want:
            problems.append(f"unexpected status: {name} got {r.status_code}, wanted {want}")
        return Outcome("bad", path, r.status_code, time.monotonic() - t, problems, what=name)

    async def one(self, rng: random.Random) -> Outcome:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
        t = time.monotonic()
        try:
            return self.record(await (self.bad() if kind == "bad" else self.good(rng, kind)))
        except httpx.HTTPError as e:  # not counted by route: the server may not have answered at all
            o = Outcome(kind, path, f"transport: {type(e).__name__}", time.monotonic() - t,
                        [f"transport: {type(e).__name__} {e}"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a reply that is not what the API says
            o = Outcome(kind, path, "unreadable", time.monotonic() - t, [f"incomplete answer: {type(e).__name__} {e}"])
        self.outcomes.append(o)
        return o

    async def client_loop(self, i: int, end: float) -> None:
        rng = random.Random(self.seed * 100_003 + i)
        await asyncio.sleep(rng.uniform(0, min(2.0, self.seconds / 10)))  # not all in the same millisecond
        while time.monotonic() < end:
            o = await self.one(rng)
            if o.status == 503:  # as the OpenAI SDKs do: wait what Retry-After says
                await asyncio.sleep(max(0.0, min(o.retry_after or 1, end - time.monotonic())))

    # -- the run -----------------------------------------------------------------------------------
    async def run(self) -> dict:
        limits = httpx.Limits(max_connections=self.clients + 4, max_keepalive_connections=self.clients + 4)
        timeout = httpx.Timeout(300, connect=60)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as self.client:
            await self.calibrate()
            self.t0 = time.monotonic()
            await self.sample("start")
            stop = asyncio.Event()
            monitor = asyncio.create_task(self.monitor(stop))
            await asyncio.gather(*(self.client_loop(i, self.t0 + self.seconds) for i in range(self.clients)))
            load_s = time.monotonic() - self.t0
            stop.set()
            await monitor  # not cancelled: a scrape cut off might be counted by the server and not by us
            drain_s, final = await self.drain()
            await self.sample("after the load")
            server, mismatch = await self.compare_counters()
        return self.report(load_s, drain_s, final, server, mismatch)

    async def calibrate(self) -> None:
        """The context (from the page's config) and tokens per word (POST /tokenize): long prompts take
        half the context, others at most a quarter, answers at most an eighth, whatever the model."""
        self.before = responses(await self.scrape())  # the server's counts before ours (its start-up /health)
        cfg = await self.client.get(self.url + "/v1/lmforge/config")
        self.sent["/v1/lmforge/config", cfg.status_code] += 1
        self.ctx = cfg.json()["context_length"]
        text = " ".join(random.Random(0).choice(WORDS) for _ in range(200))
        r = await self.client.post(self.url + "/tokenize", json={"prompt": text})
        self.sent["/tokenize", r.status_code] += 1
        per_word = r.json()["count"] / 200
        self.long_words = max(1, int(self.ctx / 2 / per_word))
        self.short_words = max(1, min(20, int(self.ctx / 4 / per_word)))
        self.bad_requests = bad_requests(self.ctx)

    async def monitor(self, stop: asyncio.Event) -> None:
        """A sample every `rss_every` seconds until `stop` is set."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.rss_every)
                return
            except TimeoutError:
                await self.sample("load")

    async def drain(self, limit: float = 60) -> tuple[float, dict]:
        """Seconds until /metrics shows no active slot and nothing queued (or `limit`), and those gauges."""
        t = time.monotonic()
        while True:
            m = await self.scrape()
            final = {"active": m.get("lmforge_active_slots"), "queued": m.get("lmforge_queue_depth")}
            if final == {"active": 0, "queued": 0} or time.monotonic() - t > limit:
                return time.monotonic() - t, final
            await asyncio.sleep(0.2)

    async def compare_counters(self, limit: float = 15) -> tuple[dict, dict]:
        """The server's reply counters against ours. A hung-up stream is counted when its handler ends,
        which may be just after the client left: wait up to `limit` s for them to agree."""
        t = time.monotonic()
        while True:
            want = {f"{path} {status}": n for (path, status), n in self.sent.items() if isinstance(status, int)}
            now = responses(await self.scrape())  # counted by the server once its reply is sent: not in this reading
            server = {k: v - self.before.get(k, 0) for k, v in now.items() if v != self.before.get(k, 0)}
            mismatch = {k: [want.get(k, 0), server.get(k, 0)] for k in want.keys() | server.keys()
                        if want.get(k, 0) != server.get(k, 0)}
            if not mismatch or time.monotonic() - t > limit:
                return server, mismatch
            await asyncio.sleep(0.5)

    # -- the figures and the goals -------------------------------------------------------------------
    def report(self, load_s: float, drain_s: float, final: dict, server: dict, mismatch: dict) -> dict:
        outs = self.outcomes
        by_status = Counter(str(o.status) for o in outs)
        by_kind = {k: dict(Counter(str(o.status) for o in outs if o.kind == k)) for k in MIX}
        problems = Counter(p.split(":")[0] for o in outs for p in o.problems)
        good = [o for o in outs if o.kind != "bad"]
        shed = sum(o.status == 503 for o in good)
        waits = [o.retry_after for o in good if o.status == 503]
        lat = [o.seconds for o in outs if o.kind in TIMED and o.status == 200 and not o.problems]
        rss = [s for s in self.samples if s["rss_mib"] is not None]
        base = next((s for s in rss if s["t"] >= self.warmup), None)
        after = [s for s in rss if base is not None and s["t"] > base["t"]]
        peak = max((s["rss_mib"] for s in after), default=None)

        five, chunks = problems["5xx"], problems["error chunk"]
        unexpected = {k: problems[k] for k in ("unexpected status", "incomplete answer", "transport") if problems[k]}
        goals = {
            "no 5xx but 503": (five + chunks == 0, f"{five} 5xx replies, {chunks} error chunks in streams"),
            "Retry-After on every 503": (problems["503 without Retry-After"] == 0,
                                         f"{problems['503 without Retry-After']} of {by_status['503']} without it"),
            "errors in OpenAI's shape": (problems["error shape"] == 0, f"{problems['error shape']} not"),
            "answered as expected": (not unexpected, str(unexpected) if unexpected else "all"),
            "RSS within +10% after warm-up": (
                peak is not None and peak <= RSS_GROWTH * base["rss_mib"],
                "no sample after warm-up" if peak is None else
                f"{base['rss_mib']:.0f} MiB at {base['t']:.0f} s, at most {peak:.0f} MiB after "
                f"({peak / base['rss_mib'] - 1:+.1%})"),
            "drained to 0 active, 0 queued": (final == {"active": 0, "queued": 0},
                                              f"{final} after {drain_s:.1f} s"),
            "server counters equal the client's": (not mismatch, "equal" if not mismatch else
                                                   f"route status: [client, server] {mismatch}"),
        }
        return {
            "clients": self.clients, "seconds": self.seconds, "load_s": round(load_s, 1), "context_length": self.ctx,
            "requests": len(outs), "requests_per_s": round(len(outs) / load_s, 2),
            "completion_tokens_per_s": round((self.samples[-1]["completion_tokens"]
                                              - self.samples[0]["completion_tokens"]) / load_s, 1),
            "by_status": dict(by_status),
            "by_kind": by_kind, "bad_requests": {name: dict(Counter(str(o.status) for o in outs if o.what == name))
                                                 for name, *_ in self.bad_requests},
            "shed_share": round(shed / max(1, len(good)), 4), "shed": shed,
            "retry_after_s": {q: pct(waits, v) if waits else None for q, v in (("min", 0), ("p50", .5), ("max", 1))},
            "latency_s": {"n": len(lat), **{q: round(pct(lat, v), 3) if lat else None
                                            for q, v in (("p50", .5), ("p95", .95), ("p99", .99))}},
            "latency_p50_by_kind_s": {k: round(pct(xs, .5), 3) for k in TIMED
                                      if (xs := [o.seconds for o in outs if o.kind == k and o.status == 200])},
            "rss_baseline_mib": base and round(base["rss_mib"], 1),
            "rss_peak_after_warmup_mib": peak and round(peak, 1),
            "samples": self.samples, "drain_s": round(drain_s, 2), "final": final,
            "server_counters": server, "problems": dict(problems),
            "problem_examples": [f"{o.kind} {o.status}: {o.problems}" for o in outs if o.problems][:10],
            "goals": {name: {"pass": ok, "detail": detail} for name, (ok, detail) in goals.items()},
            "pass": all(ok for ok, _ in goals.values()),
        }


def soak(url: str, pid: int | None, clients: int, seconds: float, rss_every: float = 30, warmup: float = 60,
         seed: int = 0) -> dict:
    """Run the mix against the server at `url` (whose process is `pid`, for its RSS) and check the goals."""
    return asyncio.run(Soak(url, pid, clients, seconds, rss_every, warmup, seed).run())


def run(clients: int, seconds: float, model: str | Path | None = None, n_layer: int = 4, n_embd: int = 256,
        serve_args: tuple[str, ...] = (), cache_mb: float = 16, rss_every: float = 30, warmup: float = 60,
        seed: int = 0, env: dict | None = None) -> dict:
    """Start `lmforge serve` on `model` (or on a random model made here) and soak it; the report,
    with the server's start line and arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = Path(tmp) / "soak"
            make_model_dir(model, n_layer, n_embd)
        args = ("--device", "cpu", "--cache-mb", str(cache_mb), *serve_args)
        with ServerProcess(model, *args, env=env) as server:
            report = soak(server.url, server.proc.pid, clients, seconds, rss_every, warmup, seed)
            report["server"] = {"args": list(args), "start": server.output().strip().splitlines()[0]}
    return report


def table(r: dict) -> str:
    """The report for people."""
    lat = r["latency_s"]
    lines = [f"{r['clients']} clients for {r['seconds']:.0f} s (the last answer at {r['load_s']:.0f} s): "
             f"{r['requests']} requests ({r['requests_per_s']}/s), {r['completion_tokens_per_s']} completion tok/s",
             f"server    {r['server']['start']}",
             "status    " + "  ".join(f"{s}: {n}" for s, n in sorted(r["by_status"].items())),
             f"shed      {r['shed']} of the good requests got 503 ({r['shed_share']:.1%}); Retry-After min "
             + ", ".join(f"{k} {v} s" for k, v in r["retry_after_s"].items()).removeprefix("min "),
             f"latency   p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s (n={lat['n']}; whole answers, "
             "200s of " + ", ".join(TIMED) + ")",
             "", f"{'kind':<12} " + " ".join(f"{s:>7}" for s in sorted(r["by_status"])) + "   p50 s"]
    for k, statuses in r["by_kind"].items():
        lines.append(f"{k:<12} " + " ".join(f"{statuses.get(s, 0):>7}" for s in sorted(r["by_status"]))
                     + f"   {r['latency_p50_by_kind_s'].get(k, '')}")
    lines += ["", f"{'t s':>7} {'RSS MiB':>8} {'active':>6} {'queued':>6} {'cache MiB':>9}"]
    for s in r["samples"]:
        rss = f"{s['rss_mib']:.0f}" if s["rss_mib"] is not None else "-"
        lines.append(f"{s['t']:>7} {rss:>8} {s['active']:>6.0f} {s['queued']:>6.0f} {s['cache_mib']:>9} {s['when']}")
    lines.append("")
    lines += [f"{'PASS' if g['pass'] else 'FAIL'}  {name}: {g['detail']}" for name, g in r["goals"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--model", help="a model directory (default: a random 4-layer model made here)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--cache-mb", type=float, default=16, help="the server's prefix cache bound")
    ap.add_argument("--rss-every", type=float, default=30, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60, help="the RSS sample the later ones are held to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("serve_args", nargs="*", help="more `lmforge serve` arguments, after --")
    a = ap.parse_args()
    r = run(a.clients, a.minutes * 60, a.model, a.n_layer, a.n_embd, tuple(a.serve_args), a.cache_mb, a.rss_every,
            a.warmup, a.seed)
    r["machine"] = f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"{r['machine']}\n{table(r)}", file=sys.stderr)
    print(json.dumps(r))
    return 0 if r["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
