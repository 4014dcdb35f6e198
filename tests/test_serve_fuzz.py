"""Fuzzing `lmforge serve` with schemathesis, from the server's own OpenAPI document (GET /openapi.json).

A real server in a subprocess on a tiny model; for every operation, a bounded, seeded run of requests
that fit the document and requests that break it. Whatever arrives, the server must not fail (no 5xx)
and every refusal must be in OpenAI's error shape.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from lmforge.serve.process import ServerProcess

# per operation and generation mode (valid, invalid): a bounded run that fits make test (~20 s on 2 cores); set
# the variable for a longer hunt (200: ~100 s)
EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    prefs = tmp_path_factory.mktemp("fuzz") / "prefs.jsonl"
    s = ServerProcess(tiny_run, "--device", "cpu", "--slots", "4", "--max-queue", "64", "--name", "tiny",
                      "--feedback", str(prefs), "--inspect", env={"OMP_NUM_THREADS": "1"})
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_the_document_lists_exactly_the_fields_the_server_takes(api):
    from lmforge.serve import inspect, responses
    from lmforge.serve.protocol import CHAT_FIELDS, COMPLETION_FIELDS

    doc = api.raw_schema
    want = {"/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS,
            "/v1/responses": set(responses.FIELDS), "/v1/embeddings": {"model", "input", "encoding_format", "user"},
            "/tokenize": {"model", "prompt", "text"},
            "/v1/lmforge/feedback": {"model", "prompt", "messages", "chosen", "rejected", "tie"},
            "/inspect": inspect.FIELDS}
    for path, fields in want.items():
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == fields and body["additionalProperties"] is False, path
    assert {m.upper() + " " + p for p, ops in doc["paths"].items() for m in ops} >= {
        "GET /health", "GET /v1/models", "GET /v1/models/{model_id}", "GET /metrics", "POST /v1/completions"}


def check(case) -> str | None:
    """What is wrong with the server's answer to `case`, or None."""
    response = case.call(timeout=30)  # a request that hangs fails here
    status = response.status_code
    if status < 400:
        return None
    what = case.as_curl_command()[:600]
    if status >= 500:
        return f"{what} -> {status} {response.text[:500]}"
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and error["message"]):
        return f"{what} -> {status}, not in OpenAI's error shape: {response.text[:500]}"
    return None


def test_fuzzed_requests_get_no_server_error_and_openai_shaped_refusals(api):
    """Every operation, with bodies and parameters that fit the document and ones that do not."""
    problems: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                problem = check(case)
                if problem is not None:
                    problems.append(problem)

            try:
                run()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(sorted(set(problems))[:20])
