"""Shared fixtures: an isolated cache, small synthetic corpora, and a tiny trained model."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # parity tests build their references locally
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_docs  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # workers x threads = cores
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

@pytest.fixture(scope="session", autouse=True)
def lmforge_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    os.environ["LMFORGE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of small text files (~40 KB)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_docs(120)):
        (d / f"doc{i:03d}.txt").write_text(doc + "\n")
    return d


def pretrained(tmp_path_factory, corpus_dir, name: str, **shape) -> Path:
    """A small GPT pretrained in-process (fast) on the synthetic corpus."""
    from lmforge.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("runs") / name
    pretrain(PretrainConfig(data=[str(corpus_dir)], out=str(out), n_layer=2, n_head=2, batch_size=8, max_steps=150,
                            eval_every=50, eval_batches=2, log_every=5, vocab_size=384, lr=1e-2, device="cpu",
                            **shape))
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_dir) -> Path:
    """A tiny GPT (2 layers x 32, context 32) for generation, CLI and export tests."""
    return pretrained(tmp_path_factory, corpus_dir, "tiny", n_embd=32, context_length=32)


@pytest.fixture(scope="session")
def ft_base(tmp_path_factory, corpus_dir) -> Path:
    """A small pretrained base for fine-tuning tests (2 layers x 64, context 64)."""
    return pretrained(tmp_path_factory, corpus_dir, "ft_base", n_embd=64, context_length=64)
