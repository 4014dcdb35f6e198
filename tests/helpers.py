"""Helpers shared by the tests: synthetic text and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The synthetic datasets live with the examples, so the README's walkthrough and the tests agree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_data import NOUNS, make_docs, make_sentences, reverse_records, spam_rows  # noqa: E402,F401


def random_model(tokenizer_file: Path, out: Path, context_length: int, n_layer: int = 2, n_embd: int = 32) -> Path:
    """An untrained model directory (seed 0) with `tokenizer_file`'s tokenizer: for tests whose
    outcome must not rest on what a model learned (long contexts, grammars, servers)."""
    import torch

    from lmforge.formats.modeldir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer
    from lmforge.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=n_layer, n_head=2,
                      n_embd=n_embd)
    save_model_dir(out, Transformer(cfg).eval(), tokenizer)
    return out


def agents_model(url: str, name: str, api: str):
    """An OpenAI Agents SDK model on an lmforge server: its Chat Completions or Responses model
    (tracing off: nothing leaves the machine)."""
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    return (OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel)(model=name, openai_client=client)


def run_cli(*args: str, timeout: int = 300, input: str | None = None, env: dict | None = None):
    """`lmforge ARGS...` in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env=full_env)


def assert_clean_error(proc, fragment: str) -> None:
    """Exit code 2, one line on stderr mentioning `fragment`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert fragment.lower() in errors[0].lower(), errors[0]



def fails(capsys, fragment: str, *args: str) -> str:
    """`lmforge ARGS` through the entry function: exit code 2, one error line mentioning `fragment`
    (returned)."""
    from lmforge.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and fragment.lower() in lines[0].lower(), err
    return lines[0]
