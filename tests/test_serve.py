"""`lmforge serve`: a real server in a subprocess on a free port, driven over HTTP by real clients."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
import torch

from lmforge import load
from lmforge.serve.process import ServerProcess

KEY = "test-key-123"


def Server(model_dir, *args: str) -> ServerProcess:  # noqa: N802 (the chat page test imports it by this name)
    return ServerProcess(model_dir, "--device", "cpu", *args, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Server(tiny_run, "--api-key", KEY, "--slots", "4", "--max-body", "4096", "--name", "tiny")
    yield s
    s.close()


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, **{"timeout": 60, **kw})


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(tiny_run, prompt: str, n: int) -> str:
    return load(tiny_run, device="cpu").generate(prompt, temperature=0, max_new_tokens=n)


def test_openai_client_gets_what_generate_gives(client, tiny_run):
    want = greedy(tiny_run, "The new", 8)
    r = client.completions.create(model="tiny", prompt="The new", max_tokens=8, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The new", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stop_reason_names_what_stopped_each_choice(server, tiny_run):
    """vLLM's `stop_reason`: the stop string (or stop token id) that ended a choice, null otherwise."""
    want = greedy(tiny_run, "The new", 8)
    stop = want[3:6]
    body = {"prompt": "The new", "max_tokens": 8, "temperature": 0}
    choice = post(server, "/v1/completions", {**body, "stop": [stop, "zzzz"]}).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (want[:want.find(stop)], "stop", stop)
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={**body, "stop": stop, "stream": True}, timeout=60) as r:
        last = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")][-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    if choice["finish_reason"] == "length":
        assert choice["stop_reason"] is None
    else:  # the model wrote its end-of-text token
        assert isinstance(choice["stop_reason"], int)


def test_chat_completions_stream_and_usage(client):
    msgs = [{"role": "user", "content": "The path"}]  # the tiny model's context is 32 tokens
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_clients_get_their_own_answers(client, tiny_run):
    prompts = [f"The {w}" for w in ("new", "valid", "first", "small", "empty", "last", "given", "current")]
    want = [greedy(tiny_run, p, 6) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                                                temperature=0).choices[0].text, prompts))
    assert got == want


def test_n_and_logprobs(client, tiny_run):
    r = client.completions.create(model="tiny", prompt="The new", max_tokens=5, temperature=1.0, n=2, seed=3)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    r = client.completions.create(model="tiny", prompt="The new", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    lm = load(tiny_run, device="cpu")  # the server's logprobs are the model's own (greedy: no filtering)
    ids = lm.tokenizer.encode("The new", add_special_tokens=True)
    new = lm.tokenizer.encode("".join(lp.tokens))
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids + new]))[0].float(), -1)
    ours = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(new)]
    # full forward vs the server's batched, cached decode (OpenBLAS): fp32 order, measured 7e-7
    assert ours == pytest.approx(lp.token_logprobs, abs=1e-3)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-5)  # greedy = top-1


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "a", "max_tokens": 4, "foo": 1}, 400, "unsupported field 'foo'"),
    ({"prompt": "a", "max_tokens": 10_000}, 400, "context"),
    ({"prompt": "a", "model": "gpt-4"}, 400, "unknown model"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "n": 0}, 400, "'n'"),
    ({"prompt": "a", "stop": 3}, 400, "stop"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a" * 5000}, 413, "body"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, fragment):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_api_key(server):
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1}, key=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1}, key="wrong").status_code == 401
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # open
    assert httpx.get(server.url + "/openapi.json").status_code == 401  # the document is behind the key too
    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "requestBody" in doc["paths"]["/v1/chat/completions"]["post"]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module")
def slow_server(tiny_run, tmp_path_factory):
    """A random model with a 4096-token context: a long greedy answer takes seconds to generate."""
    from helpers import random_model

    out = random_model(tiny_run / "tokenizer.json", tmp_path_factory.mktemp("runs") / "long", 4096, n_embd=64)
    s = Server(out, "--api-key", KEY, "--slots", "2")
    yield s
    s.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(slow_server, stream):
    body = {"prompt": "The", "max_tokens": 4000, "temperature": 0, "stream": stream}
    cancelled = metric(slow_server, "lmforge_cancelled_total")
    tokens = metric(slow_server, "lmforge_completion_tokens_total")
    start = time.time()
    if stream:
        with httpx.stream("POST", slow_server.url + "/v1/completions", timeout=60, json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):  # give up waiting for the whole answer
            post(slow_server, "/v1/completions", body, timeout=1.0)
    while metric(slow_server, "lmforge_active_slots") > 0 and time.time() - start < 30:
        time.sleep(0.1)
    assert metric(slow_server, "lmforge_active_slots") == 0
    assert metric(slow_server, "lmforge_cancelled_total") == cancelled + 1
    assert metric(slow_server, "lmforge_completion_tokens_total") - tokens < 4000  # stopped early, not run out


def test_a_small_prefill_chunk_gives_the_same_greedy_output(tiny_run):
    import subprocess
    import sys

    prompt = "The module returns the value of the"
    with Server(tiny_run, "--prefill-chunk", "2", "--slots", "2") as s:  # the prompt goes in over 5 steps
        got = [httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                          timeout=60).json()["choices"][0]["text"] for _ in range(2)]
    assert got == [greedy(tiny_run, prompt, 8)] * 2
    bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tiny_run), "--prefill-chunk", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--prefill-chunk must be >= 1" in bad.stderr


def test_tokenize_and_metrics(server):
    r = post(server, "/tokenize", {"prompt": "The new"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "lmforge_requests_total" in text and "lmforge_queue_depth" in text
    # refused requests are counted by status (they used to be invisible here)
    before = {s: metric(server, f'lmforge_rejected_total{{status="{s}"}}') if f'status="{s}"' in text else 0
              for s in (400, 404)}
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": -1}).status_code == 400
    assert httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    for status in (400, 404):
        assert metric(server, f'lmforge_rejected_total{{status="{status}"}}') == before[status] + 1


def test_stream_errors_and_done_marker(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "The", "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(json.loads(x[6:]) for x in lines[:-1])


def test_a_full_queue_is_a_503(tiny_run):
    import asyncio

    from lmforge.formats.load import load_model
    from lmforge.serve.generation import Backend
    from lmforge.serve.protocol import APIError

    class Busy:  # an engine whose queue is full: the request is refused before it is queued
        def waiting(self) -> int:
            return 4

    backend = Backend(load_model(tiny_run, device="cpu"), Busy(), "tiny", max_queue=4)
    with pytest.raises(APIError) as e:
        asyncio.run(backend.completion({"prompt": "The", "max_tokens": 2}, None))
    assert e.value.status == 503 and e.value.body()["error"]["code"] == "queue_full"
    # Retry-After: the 4 queued requests over the recent rate (10 finished over the last 4 s: 2.5/s)
    assert backend.retry_after() == 4  # nothing finished yet: one a second
    now = time.monotonic()
    backend.finished.extend(now - 4 + i * 0.4 for i in range(10))
    assert backend.retry_after() == 2  # ceil(4 / 2.5)
    backend.finished.clear()
    backend.finished.extend([now - 120] * 5 + [now - 0.1] * 200)  # old ones drop out; at least 1 s
    assert backend.retry_after() == 1


def test_default_slots_follow_memory_and_cores(tiny_run, monkeypatch):
    from lmforge.serve import server

    model = load(tiny_run, device="cpu").model
    cfg = model.cfg
    per_slot = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * cfg.context_length * 4  # fp32 keys and values
    monkeypatch.setattr(server, "cpu_cores", lambda: 2)
    monkeypatch.setattr(server, "available_memory", lambda: 4 * 10 * per_slot + 5)
    assert server.default_slots(model) == 10  # what a quarter of the free memory holds
    monkeypatch.setattr(server, "available_memory", lambda: 1 << 40)
    assert server.default_slots(model) == 16  # 8 per core
    monkeypatch.setattr(server, "available_memory", lambda: 100)
    assert server.default_slots(model) == 1


@pytest.fixture(scope="module")
def busy_server(tiny_run, tmp_path_factory):
    """One slot, a queue of one: two long streams fill both (4000 tokens take ~13 s on 2 cores)."""
    from helpers import random_model

    out = random_model(tiny_run / "tokenizer.json", tmp_path_factory.mktemp("runs") / "busy", 4096, n_layer=4,
                       n_embd=128)
    s = Server(out, "--slots", "1", "--max-queue", "1", "--name", "busy")
    yield s
    s.close()


def test_overload_is_shed_with_503_and_retry_after(busy_server):
    """A full queue sheds load with 503s that carry Retry-After (OpenAI's SDKs wait that long) in
    OpenAI's error shape, and a client with retries gets through once the load is gone."""
    from openai import OpenAI

    url = busy_server.url
    long = {"prompt": "The", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=long) as first:
        lines = first.iter_lines()  # kept: a closed line iterator would close the connection (a hang-up)
        while not next(lines).startswith("data: {"):  # in the slot
            pass
        with c.stream("POST", url + "/v1/completions", json=long) as second:  # in the queue
            deadline = time.time() + 30
            while metric(busy_server, "lmforge_queue_depth") < 1 and time.time() < deadline:
                time.sleep(0.05)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:  # the flood
                floods = list(pool.map(lambda i: c.post(url + "/v1/completions", json={
                    "prompt": f"The {i}", "max_tokens": 4, "stream": i % 2 == 0}), range(8)))
            assert [r.status_code for r in floods] == [503] * 8
            for r in floods:
                assert r.headers["Retry-After"].isdigit() and 1 <= int(r.headers["Retry-After"]) <= 60
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == "queue_full"
            rejected = metric(busy_server, 'lmforge_rejected_total{status="503"}')
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=6)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                answer = pool.submit(client.completions.create, model="busy", prompt="The", max_tokens=4)
                while metric(busy_server, 'lmforge_rejected_total{status="503"}') == rejected:
                    assert time.time() < deadline and not answer.done()
                    time.sleep(0.05)
                refused_at = time.time()
                second.close()  # the load goes away: both long streams hang up
                first.close()
                assert answer.result(timeout=60).choices[0].finish_reason in ("length", "stop")
    assert time.time() - refused_at < 30


def test_only_json_bodies(server):
    # a page on another origin could send text/plain without a CORS preflight: refused
    r = httpx.post(server.url + "/v1/completions", content='{"prompt": "a", "max_tokens": 1}',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_the_client_fits_max_tokens_to_the_context_left(server):
    """`agent --api` / `eval --api` against a small model: the prompt plus the default 256 new tokens overflow
    the 32-token context; lmforge's client sends the request again with the max_tokens that fit."""
    from lmforge.inference.client import RemoteGenerator, context_room

    gen = RemoteGenerator(server.url, api_key=KEY)
    prompt = "The module returns the value of the"  # ~10 tokens of a 32-token context
    assert post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 256}).status_code == 400
    assert isinstance(gen.complete(prompt, max_tokens=256, temperature=0), str)
    chunks = []
    gen.complete(prompt, max_tokens=256, temperature=0, on_text=chunks.append)  # streamed too
    gen.close()
    assert context_room("the prompt's 257 tokens plus max_tokens 256 exceed the model's context of 512 tokens") == 255
    assert context_room("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
                        "(4000 in the messages, 1000 in the completion).") == 96
    assert context_room("the server is busy") is None


def test_prefix_cache_serves_a_resent_history_with_the_same_output(server, tiny_run):
    """A chat resends its history: the second request starts from the cached keys and values
    (/metrics counts them) and answers as a server without the cache does."""
    first = "Return the list of the module,"  # 18 tokens: a full block of 16, and room in a 32-token context
    body = {"prompt": first, "max_tokens": 3, "temperature": 0}
    answer = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    hits = metric(server, "lmforge_prefix_cache_hit_tokens_total")
    again = {**body, "prompt": first + answer + " then"}
    got = post(server, "/v1/completions", again).json()["choices"][0]["text"]
    assert metric(server, "lmforge_prefix_cache_hit_tokens_total") - hits >= 16
    assert 0 < metric(server, "lmforge_prefix_cache_hit_rate") <= 1
    with Server(tiny_run, "--no-prefix-cache") as plain:
        assert httpx.post(plain.url + "/v1/completions", json=again, timeout=60).json()["choices"][0]["text"] == got
        assert "lmforge_prefix_cache" not in httpx.get(plain.url + "/metrics").text
