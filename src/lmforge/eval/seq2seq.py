"""Scores for generated text against references: exact match, and sacrebleu's BLEU and chrF.

BLEU and chrF are sacrebleu's corpus scores with its defaults (13a tokenization, exponential
smoothing; chrF with character 6-grams and beta 2), so the numbers compare with published ones
that report sacrebleu, on its 0-100 scale. Exact match is a fraction (0 to 1), as everywhere else
in lmforge.
"""

from __future__ import annotations

import sacrebleu

from ..core.errors import LMForgeError


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise LMForgeError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise LMForgeError("nothing to score: no predictions")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference, ignoring leading and trailing whitespace."""
    _check(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU, one reference per prediction."""
    _check(predictions, references)
    return sacrebleu.corpus_bleu(predictions, [references]).score


def chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF, one reference per prediction."""
    _check(predictions, references)
    return sacrebleu.corpus_chrf(predictions, [references]).score


def seq2seq_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{"exact_match", "bleu", "chrf", "examples"} for one set of predictions."""
    return {"exact_match": exact_match(predictions, references), "bleu": bleu(predictions, references),
            "chrf": chrf(predictions, references), "examples": len(predictions)}
