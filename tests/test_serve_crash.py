"""`lmforge serve` killed with SIGKILL mid-stream: what it wrote is whole, and a restart serves at once."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx

from lmforge.serve.process import ServerProcess


def serve(model_dir, *args: str, port: int | None = None) -> ServerProcess:
    return ServerProcess(model_dir, "--device", "cpu", "--slots", "2", *args, port=port,
                         env={"OMP_NUM_THREADS": "1"})


def vote(url: str, i: int, client: httpx.Client) -> httpx.Response:
    # sizes from a few bytes to several pages: lines that fit a page, straddle a page boundary, or are
    # longer than one (append_line writes those by rename)
    size = random.Random(i).choice([10, 1500, 3000, 4000, 9000, 20000])
    return client.post(url + "/v1/lmforge/feedback", json={"prompt": f"question {i}", "chosen": "é" * size,
                                                           "rejected": "\u2028 no", "tie": i % 3 == 0})


def whole_lines(path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # json.loads refuses a torn line


def test_kill_9_mid_stream_leaves_whole_lines_and_the_port_free_at_once(tiny_run, tmp_path):
    from helpers import random_model

    model = random_model(tiny_run / "tokenizer.json", tmp_path / "long", 4096, n_embd=64)  # long answers
    prefs = tmp_path / "prefs.jsonl"
    server = serve(model, "--feedback", str(prefs))
    url, port = server.url, server.port
    acknowledged, stop = [], threading.Event()

    def voter(first: int) -> None:
        with httpx.Client(timeout=30) as c:
            i = first
            while not stop.is_set():
                try:
                    r = vote(url, i, c)
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    acknowledged.append(i)
                i += 2

    try:
        with httpx.Client(timeout=30) as c:
            for i in range(-12, 0):
                assert vote(url, i, c).status_code == 200
            with c.stream("POST", url + "/v1/completions",
                          json={"prompt": "The", "max_tokens": 4000, "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
                voters = [threading.Thread(target=voter, args=(k,)) for k in (0, 1)]
                for t in voters:
                    t.start()
                time.sleep(random.uniform(0.3, 1.0))  # votes being written, the answer mid-stream
                server.proc.kill()
                server.proc.wait()
                stop.set()
                try:  # the stream breaks off: it never ended with [DONE]
                    rest = list(lines)
                except httpx.HTTPError:
                    rest = []
                assert "data: [DONE]" not in rest
        for t in voters:
            t.join(timeout=30)
    finally:
        server.close()
    records = whole_lines(prefs)
    assert len(records) >= 12 + len(acknowledged)  # every vote answered 200 is there, whole
    assert all(set(r) >= {"prompt", "chosen", "rejected"} for r in records)
    assert b"\xe2\x80\xa8" not in prefs.read_bytes()  # U+2028 escaped: splitlines() readers see one line per vote

    started = time.time()
    with serve(model, "--feedback", str(prefs), port=port) as again:  # binds at once (SO_REUSEADDR)
        assert time.time() - started < 60
        r = httpx.post(again.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        with httpx.Client(timeout=30) as c:
            assert vote(again.url, 100, c).status_code == 200
    assert len(whole_lines(prefs)) == len(records) + 1
