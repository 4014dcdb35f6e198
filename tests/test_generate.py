"""Sampling: randomness controls, stop strings, streaming, KV cache, ranked candidates."""

from __future__ import annotations

import pytest
import torch

from lmforge import load
from lmforge.core.errors import LMForgeError
from lmforge.inference.generate import generate_ids
from lmforge.inference.sampling import filter_probs


def test_temperature_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    p = filter_probs(logits, 1.0, None, None)
    assert torch.allclose(p, torch.softmax(logits, 0))
    assert torch.allclose(filter_probs(logits, 0.5, None, None), torch.softmax(logits / 0.5, 0))
    k2 = filter_probs(logits, 1.0, 2, None)
    assert (k2 > 0).sum() == 2 and torch.allclose(k2[:2], torch.softmax(logits[:2], 0))
    # p = .607 .223 .135 .030 .004: the first two hold .83 of the mass
    assert (filter_probs(logits, 1.0, None, 0.8) > 0).sum() == 2
    nucleus = filter_probs(logits, 1.0, None, 0.85)
    assert (nucleus > 0).sum() == 3 and abs(nucleus.sum().item() - 1) < 1e-6
    assert (filter_probs(logits, 1.0, None, 0.1) > 0).sum() == 1  # the top token always stays


def test_same_seed_same_text(tiny_run):
    lm = load(tiny_run, device="cpu")
    a = lm.generate("The new", max_new_tokens=20, temperature=1.0, seed=7)
    b = lm.generate("The new", max_new_tokens=20, temperature=1.0, seed=7)
    c = lm.generate("The new", max_new_tokens=20, temperature=1.0, seed=8)
    assert a == b and a != c


def test_cached_and_uncached_generation_agree(tiny_run):
    lm = load(tiny_run, device="cpu")
    ids = lm.tokenizer.encode("The given value")
    cached = [s.token for s in generate_ids(lm.model, ids, 15, temperature=0)]
    plain = [s.token for s in generate_ids(lm.model, ids, 15, temperature=0, use_cache=False)]
    assert cached == plain
    sampled = [s.token for s in generate_ids(lm.model, ids, 15, temperature=1.0, top_k=5, seed=1)]
    assert sampled == [s.token for s in generate_ids(lm.model, ids, 15, temperature=1.0, top_k=5, seed=1,
                                                     use_cache=False)]


def test_stop_strings_and_streaming(tiny_run):
    lm = load(tiny_run, device="cpu")
    full = lm.generate("The", max_new_tokens=25, temperature=0)
    stop = full.split()[3]  # a string the greedy continuation is known to contain
    pieces: list[str] = []
    cut = lm.generate("The", max_new_tokens=25, temperature=0, stop=["never appears", stop], stream=pieces.append)
    assert cut == full[:full.index(stop)] and stop not in cut
    assert "".join(pieces) == cut and len(pieces) > 1
    assert lm.generate("The", max_new_tokens=25, temperature=0, stop=["never appears"]) == full


def test_top_candidates_are_the_sampling_distribution(tiny_run):
    lm = load(tiny_run, device="cpu")
    seen = []
    lm.generate("The", max_new_tokens=5, temperature=0.7, top_k=3, seed=0, top_candidates=5,
                on_candidates=lambda step, ranked, chosen: seen.append((ranked, chosen)))
    assert len(seen) == 5
    for ranked, chosen in seen:
        probs = [p for _, p in ranked]
        assert len(ranked) <= 3 and probs == sorted(probs, reverse=True)  # top-k=3 leaves at most 3
        assert abs(sum(probs) - 1) < 1e-5 and chosen in [t for t, _ in ranked]


def test_max_new_tokens_beyond_context(tiny_run):
    lm = load(tiny_run, device="cpu")
    with pytest.raises(LMForgeError, match="exceeds the model's context length"):
        lm.generate("The", max_new_tokens=lm.config.context_length)
