"""`serve --inspect`: POST /inspect returns the weights `Transformer.inspect` computes, for token ids,
text or a chat plus the ids a completion returned; refuses bad input with OpenAI-shaped 400s; is a 404
(and absent from the OpenAPI document) without the flag; and cannot disturb generation beside it."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
import torch
from test_serve import Server

from lmforge import load
from lmforge.inference import inspect
from lmforge.inference.chat import chat_ids, chat_setup

TEXT = "The new list of the"
MESSAGES = [{"role": "user", "content": "The new"}]


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Server(tiny_run, "--inspect", "--name", "tiny", "--slots", "4")
    yield s
    s.close()


@pytest.fixture(scope="module")
def lm(tiny_run):
    return load(tiny_run, device="cpu")


def ask(server, body) -> httpx.Response:
    return httpx.post(server.url + "/inspect", json=body, timeout=60)


def weights(lm, ids: list[int], layer: int, head: int | None = None) -> torch.Tensor:
    """The reference: `Transformer.inspect`'s map, one head's or the mean over heads."""
    w = lm.model.inspect(torch.tensor([ids]), layers=[layer])[0][0][0]
    return w.mean(0) if head is None else w[head]


def close(got: list, want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.double(), atol=1e-6, rtol=0)


def test_weights_equal_transformer_inspect(server, lm):
    cfg = lm.config
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=True)
    r = ask(server, {"tokens": ids})  # the defaults: the last layer, the mean over heads, every row
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["layer"], body["head"], body["start"]) == (cfg.n_layer - 1, None, 0)
    assert (body["n_layer"], body["n_head"]) == (cfg.n_layer, cfg.n_head) == (2, 2)
    assert body["ids"] == ids and body["tokens"] == inspect.pieces(lm, ids) and body["prompt_tokens"] == len(ids)
    close(body["attention"], weights(lm, ids, cfg.n_layer - 1))
    assert all(abs(sum(row) - 1) < 1e-5 for row in body["attention"])

    # one head, of the first layer, from text, the last 3 rows: as `lmforge inspect attention` computes it
    one = ask(server, {"text": TEXT, "layer": 0, "head": 1, "start": -3}).json()
    assert one["ids"] == ids and (one["layer"], one["head"], one["start"]) == (0, 1, len(ids) - 3)
    ref = inspect.attention(lm, TEXT, layer=0, head=1)["attention"][0][0]
    close(one["attention"], torch.tensor(ref[-3:]))
    assert one["attention"] != body["attention"][-3:]


def test_a_chat_and_the_ids_its_answer_returned(server, lm):
    """With --inspect, logprobs carry token ids: the page sends them back after the chat's messages."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True})
    choice = r.json()["choices"][0]
    answer = [x["token_id"] for x in choice["logprobs"]["content"]]
    assert answer and lm.tokenizer.decode(answer) == choice["message"]["content"]
    prompt = chat_ids(lm, chat_setup(lm)[0], MESSAGES)

    body = ask(server, {"messages": MESSAGES, "continuation": answer, "start": -len(answer) - 1, "head": 0}).json()
    ids = prompt + answer
    assert body["ids"] == ids and body["prompt_tokens"] == len(prompt) and body["start"] == len(prompt) - 1
    close(body["attention"], weights(lm, ids, 1, head=0)[len(prompt) - 1:])

    legacy = httpx.post(server.url + "/v1/completions", timeout=60,
                        json={"prompt": "The new", "max_tokens": 4, "temperature": 0, "logprobs": 0}).json()
    lp = legacy["choices"][0]["logprobs"]
    assert len(lp["token_ids"]) == len(lp["tokens"]) and lm.tokenizer.decode(lp["token_ids"]) == \
        legacy["choices"][0]["text"]


@pytest.mark.parametrize("body,param,fragment", [
    ({"tokens": [1, 2], "layer": 2}, "layer", "between 0 and 1"),
    ({"tokens": [1, 2], "layer": -1}, "layer", "between 0 and 1"),
    ({"tokens": [1, 2], "head": 2}, "head", "between 0 and 1"),
    ({"tokens": [1, 2], "layer": 0.5}, "layer", "integer"),
    ({"tokens": list(range(33))}, "tokens", "at most 32"),
    ({"tokens": list(range(20)), "continuation": list(range(20))}, "tokens", "context is 32"),
    ({"text": "The new list " * 20}, "text", "context is 32"),
    ({"tokens": [1, 384]}, "tokens", "0..383"),
    ({"tokens": [1, True]}, "tokens", "token ids"),
    ({"tokens": []}, "tokens", "empty"),
    ({"tokens": [1, 2], "start": 2}, "start", "between -2 and 1"),
    ({"tokens": [1, 2], "start": -3}, "start", "between -2 and 1"),
    ({"tokens": [1], "text": "a"}, "tokens", "exactly one"),
    ({"layer": 0}, "tokens", "exactly one"),
    ({"text": 3}, "text", "string"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    ({"tokens": [1], "heads": 1}, "heads", "unsupported field"),
    ({"tokens": [1], "model": "other"}, "model", "unknown model"),
])
def test_bad_requests_are_400s_in_openai_shape(server, body, param, fragment):
    r = ask(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment.lower() in error["message"].lower(), error["message"]


def test_inspection_beside_generation_disturbs_neither(server, lm):
    """The inspect forward holds the engine between steps: streams decoding meanwhile keep their
    greedy output, and every inspection gets the same weights."""
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=True)
    want = ask(server, {"tokens": ids}).json()["attention"]
    text = lm.generate("The new", temperature=0, max_new_tokens=16)

    def complete() -> str:
        body = {"prompt": "The new", "max_tokens": 16, "temperature": 0}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(complete) for _ in range(4)]
        looks = [pool.submit(ask, server, {"tokens": ids}) for _ in range(8)]
        assert [a.result() for a in answers] == [text] * 4
        assert all(look.result().json()["attention"] == want for look in looks)


def test_exclusive_holds_the_engine_between_steps(lm):
    """What /inspect runs under: while held, the engine's thread takes no step (a request waits,
    untouched); released, the request runs as it would have."""
    import time

    from lmforge.inference.engine import Engine, Request

    ids = lm.tokenizer.encode("The new", add_special_tokens=True)
    with Engine(lm.model, slots=1) as engine:
        want = engine.generate([Request(prompt=ids, max_tokens=4, temperature=0)])[0][0].tokens
        with engine.exclusive():
            handle = engine.submit(Request(prompt=ids, max_tokens=4, temperature=0))
            time.sleep(0.5)
            assert handle.events.empty() and engine.active() == 0 and engine.waiting() == 1
            assert not lm.model.training
        assert handle.result()[0].tokens == want


def test_off_by_default(tiny_run):
    s = Server(tiny_run, "--name", "tiny")
    try:
        r = ask(s, {"tokens": [1, 2]})
        assert r.status_code == 404 and "--inspect" in r.json()["error"]["message"]
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "/inspect" not in httpx.get(s.url + "/openapi.json").json()["paths"]
        assert httpx.get(s.url + "/v1/lmforge/config").json()["inspect"] is None
        lp = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "messages": MESSAGES, "max_tokens": 2, "logprobs": True}).json()["choices"][0]["logprobs"]["content"]
        assert lp and all("token_id" not in x for x in lp)  # OpenAI's shape exactly, unless asked
    finally:
        s.close()


def test_on_it_is_documented_and_offered_to_the_page(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    schema = doc["paths"]["/inspect"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    from lmforge.serve.inspect import FIELDS

    assert set(schema["properties"]) == FIELDS and schema["additionalProperties"] is False
    assert httpx.get(server.url + "/v1/lmforge/config").json()["inspect"] == {"n_layer": 2, "n_head": 2}


def test_an_encoder_server_inspects_too(tmp_path):
    from hf_fixtures import tiny_bert

    tiny_bert(tmp_path)
    lm = load(tmp_path, device="cpu")
    s = Server(tmp_path, "--inspect")
    try:
        ids = inspect.encode(lm, "A man is eating food.")
        body = ask(s, {"tokens": ids, "layer": 1, "head": 2}).json()
        close(body["attention"], weights(lm, ids, 1, head=2))
        assert min(body["attention"][0][1:]) > 0  # an encoder's first token sees the later ones
        r = ask(s, {"messages": MESSAGES})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert httpx.post(s.url + "/v1/embeddings", json={"input": "A man"}, timeout=60).status_code == 200
    finally:
        s.close()


def test_work_is_bounded_whatever_the_context():
    """An untrusted client cannot ask for more than MAX_TOKENS of explicit weights, nor queue more
    than MAX_WAITING inspections (the engine holds still during each)."""
    import asyncio
    from types import SimpleNamespace

    from lmforge.serve.inspect import MAX_TOKENS, MAX_WAITING, Inspector, parse_inspect
    from lmforge.serve.protocol import APIError

    cfg = SimpleNamespace(vocab_size=10, context_length=4 * MAX_TOKENS, n_layer=2, n_head=2)
    backend = SimpleNamespace(lm=SimpleNamespace(config=cfg), template=None)
    assert len(parse_inspect({"tokens": [1] * MAX_TOKENS}, backend).ids) == MAX_TOKENS
    with pytest.raises(APIError, match=f"at most {MAX_TOKENS}"):
        parse_inspect({"tokens": [1] * (MAX_TOKENS + 1)}, backend)
    with pytest.raises(APIError, match="continuation"):
        parse_inspect({"tokens": [1], "continuation": {}}, backend)
    inspector = Inspector(backend)
    inspector.waiting = MAX_WAITING
    with pytest.raises(APIError) as refused:
        asyncio.run(inspector({"tokens": [1, 2]}))
    assert refused.value.status == 503
