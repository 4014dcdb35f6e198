"""`--size auto` weighs repeated data: effective tokens (Muennighoff et al. 2023) and a warning."""

from __future__ import annotations

import math

import pytest

from lmforge.core.errors import LMForgeError
from lmforge.models.sizing import choose_depth, effective_tokens, passes_warning, sized_config, trained_params


def test_effective_tokens_follows_the_data_constrained_formula():
    assert effective_tokens(1e6, None) == 1e6 and effective_tokens(1e6, 2e6) == 1e6  # no repetition
    u = 1e5
    # float64, the formula in another order: ~1e-16, default rel 1e-6
    assert effective_tokens(4 * u, u) == pytest.approx(u * (1 + 15.4 * (1 - math.exp(-3 / 15.4))))
    assert 0.9 * 4 * u < effective_tokens(4 * u, u) < 4 * u  # four passes: nearly as good as new data
    assert effective_tokens(1000 * u, u) < 16.5 * u  # it saturates: ~16 passes' worth at most


def test_auto_size_shrinks_the_model_when_the_budget_mostly_repeats_data():
    d4 = sized_config("gpt2", 4, 4096, 256)
    budget = 20 * trained_params(d4)
    plain, _ = choose_depth("gpt2", 4096, 256, 2048, max_tokens=budget, seconds=None, step_seconds=None)
    assert plain == 4
    small, report = choose_depth("gpt2", 4096, 256, 2048, max_tokens=budget, seconds=None, step_seconds=None,
                                 unique_tokens=budget / 35)
    assert small < plain
    assert "worth" in report[-2]  # the report says what the repeated tokens are worth
    assert report[-1].startswith("warning: the budget means 35.0 passes")


def test_many_passes_are_warned_about():
    assert passes_warning(4e5, 1e5) is None
    warning = passes_warning(34.6 * 143_000, 143_000)
    assert warning and "34.6 passes" in warning and "143,000" in warning


def test_a_non_positive_budget_is_a_clear_error():
    with pytest.raises(LMForgeError, match="positive budget"):
        choose_depth("gpt2", 4096, 256, 2048, max_tokens=-5 * 2048, seconds=None, step_seconds=None)


def test_pretraining_says_what_it_read_and_warns_about_many_passes(corpus_dir, tmp_path):
    from helpers import run_cli

    p = run_cli("pretrain", "--data", str(corpus_dir), "--out", str(tmp_path / "run"), "--n-layer", "1",
                "--n-embd", "32", "--n-head", "2", "--context-length", "16", "--batch-size", "4", "--vocab-size", "300",
                "--device", "cpu", "--epochs", "6", "--eval-every", "1000", "--save-every", "0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data: 120 files: 120 documents" in p.stderr
    assert "6.0 passes over" in p.stderr and "warning:" in p.stderr
