"""Pretraining objectives for encoder-decoder models, as pure transforms on token ids.

- T5's span corruption: 15% of the tokens, in spans of mean length 3, are cut out; the input keeps
  the rest with one sentinel in place of each span, the target lists each sentinel and its span.
- BART's text infilling: spans with Poisson(3) lengths, 30% of the tokens in all, each become one
  mask token (a zero-length span inserts one); the target is the original text.

Every function takes a `numpy.random.Generator`, so one seed reproduces a run's noise exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core.errors import LMForgeError


def t5_sentinels(vocab_size: int, n: int = 100) -> list[int]:
    """T5's sentinel ids: `<extra_id_0>` is the last id of the vocabulary, `<extra_id_1>` the one
    below it, and so on."""
    return list(range(vocab_size - 1, vocab_size - 1 - n, -1))


def _segment(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of `num_items` into `num_segments` non-empty runs: mark
    the first item of each run after the first by shuffling num_segments - 1 ones among the
    num_items - 1 boundaries (T5's `_random_segmentation`)."""
    first = np.zeros(num_items, dtype=np.int64)
    first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first), minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Boolean mask [length] of the tokens to corrupt, by T5's `random_spans_noise_mask`:
    round(length * density) noise tokens (at least 1, at most length - 1) in round(noise / mean
    span length) spans (at least 1); the noise and the non-noise tokens are each split at random
    into that many runs, and the runs interleave, kept run first. So the mask always ends in noise.
    T5 would fail where there are more spans than kept tokens; here the count is capped there."""
    if not 0 < noise_density < 1 or mean_noise_span_length < 1:
        raise LMForgeError(f"span corruption needs 0 < noise density < 1 and mean span length >= 1 (got "
                           f"{noise_density}, {mean_noise_span_length})")
    orig_length = length
    length = max(length, 2)  # T5's guard: one token can be neither all noise nor none
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), num_noise, length - num_noise)
    noise_lengths = _segment(num_noise, num_spans, rng)
    kept_lengths = _segment(length - num_noise, num_spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    span_num = np.zeros(length, dtype=np.int64)
    span_num[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(span_num) % 2 == 1)[:orig_length]


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(tokens per example, target length) such that span corruption of that many tokens gives
    inputs of exactly `inputs_length` with one EOS each (T5's `random_spans_helper`: 512 -> 568, 114).
    Pack raw text into rows of the first number; pad targets to the second."""
    def lengths(tokens: int) -> tuple[int, int]:
        noise = round(tokens * noise_density)
        spans = round(noise / mean_noise_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    if inputs_length < 2:
        raise LMForgeError(f"span corruption needs inputs of at least 2 tokens, not {inputs_length}")
    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def span_corrupt(ids: Sequence[int], rng: np.random.Generator, sentinels: Sequence[int], eos_id: int | None = None,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[list[int], list[int]]:
    """T5's span corruption of one sequence: (inputs, targets). Inputs keep the kept tokens with
    sentinels[i] in place of noise span i; targets are sentinels[i] followed by span i, for each
    span in order (`eos_id`, when given, ends both). `t5_sentinels(vocab_size)` gives T5's ids."""
    ids = np.asarray(ids, dtype=np.int64)
    noise = random_spans_noise_mask(len(ids), rng, noise_density, mean_noise_span_length)
    inputs, targets = _replace_spans(ids, noise, sentinels), _replace_spans(ids, ~noise, sentinels)
    end = [] if eos_id is None else [eos_id]
    return inputs + end, targets + end


def _replace_spans(ids: np.ndarray, mask: np.ndarray, sentinels: Sequence[int]) -> list[int]:
    """`ids` with each run of masked tokens replaced by the next sentinel (T5's
    `noise_span_to_unique_sentinel`)."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    if starts.sum() > len(sentinels):
        raise LMForgeError(f"{int(starts.sum())} spans to replace but only {len(sentinels)} sentinel ids")
    out = ids.copy()
    out[starts] = np.asarray(sentinels, dtype=np.int64)[:int(starts.sum())]
    return out[~mask | starts].tolist()


def infilling_spans(length: int, rng: np.random.Generator, mask_ratio: float = 0.3,
                    poisson_lambda: float = 3.0) -> list[tuple[int, int]]:
    """(start, length) of BART's text-infilling spans over `length` tokens, left to right: lengths
    drawn from Poisson(lambda) until they cover ceil(length * mask_ratio) tokens (the last one cut
    to fit), then placed uniformly at random without overlapping, so exactly that many tokens are
    masked. Zero-length spans are insertion points. (fairseq's implementation lets spans overlap,
    which masks fewer tokens than the ratio.)"""
    if not 0 <= mask_ratio <= 1 or poisson_lambda <= 0:
        raise LMForgeError(f"text infilling needs 0 <= mask ratio <= 1 and lambda > 0 (got {mask_ratio}, "
                           f"{poisson_lambda})")
    target = math.ceil(length * mask_ratio)
    spans: list[int] = []
    total = 0
    while total < target:
        for n in rng.poisson(poisson_lambda, size=max(8, 2 * math.ceil(target / max(poisson_lambda, 1)))).tolist():
            spans.append(min(n, target - total))
            total += spans[-1]
            if total == target:
                break
    spans = rng.permutation(np.asarray(spans, dtype=np.int64)).tolist()  # the cut one may land anywhere
    # Stars and bars: k spans among the length - target kept tokens are k chosen slots of k + kept.
    kept = length - target
    slots = np.zeros(kept + len(spans), dtype=bool)
    slots[rng.choice(len(slots), size=len(spans), replace=False)] = True
    out, pos, i = [], 0, 0
    for is_span in slots.tolist():
        if is_span:
            out.append((pos, spans[i]))
            pos, i = pos + spans[i], i + 1
        else:
            pos += 1
    return out


def text_infill(ids: Sequence[int], rng: np.random.Generator, mask_id: int, mask_ratio: float = 0.3,
                poisson_lambda: float = 3.0) -> tuple[list[int], list[int]]:
    """BART's text infilling of one sequence: (noisy input, target = the original ids). Each span of
    `infilling_spans` becomes one `mask_id`; a zero-length span inserts one."""
    ids = list(ids)
    out, pos = [], 0
    for start, n in infilling_spans(len(ids), rng, mask_ratio, poisson_lambda):
        out += ids[pos:start] + [mask_id]
        pos = start + n
    return out + ids[pos:], ids
