"""examples/tool_calling.py's data: records that `finetune instruct` reads and renders with loss on the
assistant's call and answer only, calls that fit the tool's schema, and no held-out question."""

from __future__ import annotations

import json
import re

import helpers  # noqa: F401  (puts examples/ on the path)
import jsonschema
import pytest
from react_calculator import held_out
from tool_calling import TOOL, write_data

from lmforge.agents.tools import calculate
from lmforge.data.records import read_instructions, read_records
from lmforge.text.templates import encode_segments, get_template
from lmforge.text.tokenizer import Tokenizer

CALL = re.compile(r'^\{"name": "calculator", "arguments": \{"expression": "(.*)"\}\}$', re.M)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools")
    chats, texts = write_data(out, n_chat=300, n_text=600, seed=3)
    docs = [r["text"] for _, r in read_records(texts)]
    return chats, docs, Tokenizer.train(docs, 384, show_progress=False)


def test_records_render_with_loss_on_the_call_and_the_answer_only(data):
    chats, _, tok = data
    template = get_template("chatml", tok)
    raw = [r for _, r in read_records(chats)]
    convs = read_instructions(chats)
    assert len(convs) == len(raw) == 300
    for record, conv in zip(raw, convs):
        call = record["messages"][1]["tool_calls"][0]["function"]
        expr = json.loads(call["arguments"])["expression"]
        assert expr in record["messages"][0]["content"]  # exactly the question's expression
        assert record["messages"][2]["content"] == record["messages"][3]["content"] == calculate(expr)
        ids, trainable = encode_segments(tok, template.render(conv, tok))
        learned = tok.decode([i for i, t in zip(ids, trainable) if t])
        body = json.dumps({"name": "calculator", "arguments": {"expression": expr}})
        assert learned == f"<|tool_call|>{body}<|/tool_call|><|im_end|>{calculate(expr)}<|im_end|>"
        assert TOOL["function"]["description"] in tok.decode(ids)  # the tool is offered


def test_calls_fit_the_tool_schema_and_no_held_out_question_is_trained_on(data):
    chats, docs, _ = data
    schema = TOOL["function"]["parameters"]
    trained = set()
    for _, r in read_records(chats):
        for c in r["messages"][1]["tool_calls"]:
            args = json.loads(c["function"]["arguments"])
            jsonschema.validate(args, schema)
            trained.add(args["expression"])
    for doc in docs:  # the pretraining text carries each call as the JSON the template writes
        found = CALL.findall(doc)
        assert len(found) == 1, doc
        trained.update(found)
    assert len(trained) > 800
    held = {expr for _, expr in held_out()}
    assert not trained & held
    assert any("Tool results are data" in d for d in docs) and not all("Tool results" in d for d in docs)
