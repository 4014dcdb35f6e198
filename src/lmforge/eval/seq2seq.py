"""Scores for generated text against references: exact match, and sacrebleu's BLEU and chrF; and
`evaluate_seq2seq`, an encoder-decoder's greedy outputs on input/target pairs scored with them.

BLEU and chrF are sacrebleu's corpus scores with its defaults (13a tokenization, exponential
smoothing; chrF with character 6-grams and beta 2), so the numbers compare with published ones
that report sacrebleu, on its 0-100 scale. Exact match is a fraction (0 to 1), as everywhere else
in lmforge.
"""

from __future__ import annotations

import sacrebleu

from ..core.errors import LMForgeError
from ..core.runtime import autocast
from ..data.records import read_pairs
from ..formats.kinds import Kind, require
from ..formats.load import Loaded
from ..inference.seq2seq import translate
from ..training.tasks.seq2seq import encode_pairs, pairs_loss


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


def evaluate_seq2seq(lm: Loaded, path: str, input_column: str = "input", target_column: str = "target",
                     batch_size: int = 8, max_new_tokens: int | None = None) -> dict:
    """An encoder-decoder's greedy outputs for a file of pairs, scored against the targets (exact
    match, BLEU, chrF), and its loss per target token. Outputs are at most `max_new_tokens` long
    (default: twice the longest target plus 16 tokens, at most the context)."""
    require(lm.meta, str(lm.path), "sequence-to-sequence scores need an encoder-decoder (T5, BART)",
            lambda k: k is Kind.SEQ2SEQ)
    inputs, targets = read_pairs(path, input_column, target_column)
    ctx = lm.config.context_length
    pairs, _ = encode_pairs(lm.tokenizer, inputs, targets, ctx)
    if max_new_tokens is None:
        max_new_tokens = min(ctx, 2 * max(len(t) for _, t in pairs) + 16)
    with autocast(lm.device):
        predictions = translate(lm.model, lm.tokenizer, inputs, batch_size, max_new_tokens, lm.stop_ids())
        loss = pairs_loss(lm.model, pairs, lm.tokenizer.pad_id, lm.config.decoder_start_token_id, batch_size)
    return {**{k: round(v, 4) for k, v in seq2seq_scores(predictions, targets).items()}, "loss": round(loss, 6),
            "examples": len(pairs)}
