"""`lmforge chat` library side: warnings and checks before the conversation starts."""

from __future__ import annotations

import io

import pytest

from lmforge import load
from lmforge.core.errors import LMForgeError
from lmforge.inference.chat import chat


def test_base_model_warns_once_that_it_was_not_tuned_for_chat(tiny_run, capsys):
    lm = load(tiny_run, device="cpu")
    out = io.StringIO()
    history = chat(lm, max_new_tokens=3, temperature=0, stdin=io.StringIO("hello\nagain\n"), stdout=out)
    err = capsys.readouterr().err
    assert history[-1]["role"] == "assistant" and out.getvalue().count("assistant>") == 2
    warnings = [line for line in err.splitlines() if "not tuned for chat" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")


def test_chat_tuned_model_does_not_warn(tiny_run, capsys):
    lm = load(tiny_run, device="cpu")
    lm.meta["chat_template"] = {"name": "chatml"}  # what `finetune instruct` records
    chat(lm, max_new_tokens=3, temperature=0, stdin=io.StringIO("hello\n"), stdout=io.StringIO())
    assert "not tuned for chat" not in capsys.readouterr().err


def test_bad_sampling_settings_fail_before_the_conversation(tiny_run):
    lm = load(tiny_run, device="cpu")
    out = io.StringIO()
    with pytest.raises(LMForgeError, match="--top-p"):
        chat(lm, top_p=2.0, stdin=io.StringIO("hello\n"), stdout=out)
    assert out.getvalue() == ""
