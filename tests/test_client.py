"""`inference.client`: a local model and the same model behind `lmforge serve` answer alike."""

from __future__ import annotations

import time

import pytest

from lmforge.core.errors import LMForgeError
from lmforge.formats.load import load_model
from lmforge.inference.client import LocalGenerator, RemoteGenerator, api_base, open_generator
from lmforge.serve.process import ServerProcess, free_port


@pytest.fixture(scope="module")
def pair(tiny_run):
    with ServerProcess(tiny_run, "--device", "cpu", "--api-key", "k", env={"OMP_NUM_THREADS": "1"}) as server:
        yield LocalGenerator(load_model(tiny_run, "cpu")), RemoteGenerator(server.url, api_key="k", timeout=30)


def test_local_and_remote_agree_at_temperature_0(pair):
    local, remote = pair
    for kw in ({}, {"stop": ["e"]}):
        want = local.complete("The new", max_tokens=8, **kw)
        assert remote.complete("The new", max_tokens=8, **kw) == want
        pieces: list[str] = []
        assert remote.complete("The new", max_tokens=8, on_text=pieces.append, **kw) == want == "".join(pieces)
    msgs = [{"role": "user", "content": "The path"}]
    want = local.chat(msgs, max_tokens=4)
    assert remote.chat(msgs, max_tokens=4) == want
    assert remote.name  # the server's first model, asked for when none is named


def test_local_cuts_max_tokens_to_the_context(pair):
    local, _ = pair
    assert len(local.lm.tokenizer.encode(local.complete("The", max_tokens=10_000))) <= 32


def test_bad_remote_settings_are_one_line_errors(pair):
    _, remote = pair
    with pytest.raises(LMForgeError, match="401"):
        RemoteGenerator(remote.base, api_key="wrong", timeout=10)
    with pytest.raises(LMForgeError, match="not an http"):
        api_base("ftp://example.org")
    assert api_base("http://h:1") == "http://h:1/v1" == api_base("http://h:1/v1/")
    start = time.monotonic()
    with pytest.raises(LMForgeError, match="cannot reach"):
        RemoteGenerator(f"http://127.0.0.1:{free_port()}", timeout=5)
    assert time.monotonic() - start < 5
    with pytest.raises(LMForgeError, match="exactly one"):
        open_generator()
