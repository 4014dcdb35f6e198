"""Encoder-decoders (T5, BART) write text through the one engine: `lmforge.load(...).generate`,
`lmforge generate` and the server's /v1/completions give what the one-request reference loop
(`generate_seq2seq_ids`, itself equal to transformers) gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import run_cli
from hf_fixtures import tiny_seq2seq

import lmforge
from lmforge.inference.generate import generate_seq2seq_ids
from lmforge.serve.process import ServerProcess

SOURCES = ["The quick brown fox", "jumps over the lazy dog, twice."]


def reference(lm, text: str, n: int) -> str:
    src = lm.tokenizer.encode(text, add_special_tokens=True)
    steps = generate_seq2seq_ids(lm.model, src, n, stop_ids=set(lm.stop_ids()))
    return lm.tokenizer.decode([s.token for s in steps])


@pytest.fixture(scope="module", params=["t5", "bart"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_seq2seq(request.param, path)
    return path


def test_generate_in_python_and_on_the_command_line(model_dir):
    lm = lmforge.load(model_dir, dtype="float32")
    want = reference(lm, SOURCES[0], 12)
    assert lm.generate(SOURCES[0], max_new_tokens=12, temperature=0) == want
    proc = run_cli("generate", str(model_dir), "--prompt", SOURCES[0], "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"  # the answer alone: it does not continue the source


def test_the_server_completes_and_refuses_chat(model_dir):
    import httpx
    from openai import BadRequestError, OpenAI

    lm = lmforge.load(model_dir, dtype="float32")
    args = ("--device", "cpu", "--slots", "3", "--name", "m")
    with ServerProcess(model_dir, *args, env={"OMP_NUM_THREADS": "1"}) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        with ThreadPoolExecutor(4) as pool:  # decoded together in the engine's slots
            replies = list(pool.map(lambda s: client.completions.create(model="m", prompt=s, max_tokens=10,
                                                                        temperature=0, n=2), SOURCES * 2))
        want = [reference(lm, s, 10) for s in SOURCES] * 2
        assert [[c.text for c in r.choices] for r in replies] == [[w, w] for w in want]
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=SOURCES[1], max_tokens=10, temperature=0, stream=True))
        assert streamed == reference(lm, SOURCES[1], 10)
        with pytest.raises(BadRequestError, match="use /v1/completions"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        too_long = "word " * (lm.config.context_length + 10)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": too_long, "max_tokens": 3}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_structured_output_where_the_grammar_library_reads_the_tokenizer(model_dir):
    """BART's byte-level BPE: a JSON schema holds, through the engine's grammar. T5's Unigram
    tokenizer: llguidance cannot read it, a one-line error."""
    import json

    from lmforge.core.errors import LMForgeError

    lm = lmforge.load(model_dir, dtype="float32")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    if lm.meta["model"]["pos_embedding"] == "relative":  # T5
        with pytest.raises(LMForgeError, match="cannot read this tokenizer"):
            lm.generate(SOURCES[0], json_schema=schema, max_new_tokens=20)
    else:
        assert isinstance(json.loads(lm.generate(SOURCES[0], json_schema=schema, max_new_tokens=20))["ok"], bool)
