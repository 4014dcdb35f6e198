"""What the reward model and DPO share: preference records -> encoded answers -> batches.

A batch element is one prompt with all its answers (each answer forwarded once) and all its
(better, worse) pairs; a prompt's loss is the mean over its pairs, so a ranking of K answers
weighs as much as one pair (InstructGPT: its C(K, 2) pairs are not independent examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.runtime import Dist
from ...data.collate import IGNORE, collate, pad_batch
from ...data.preferences import Ranking, encode_answer, read_preferences
from ...data.tokens import EpochOrder
from ...text.templates import Template
from ...text.tokenizer import Tokenizer
from ..align_config import PreferenceConfig
from ..finetune import read_examples
from ..metrics import TaskMetrics


@dataclass
class Encoded:
    """One prompt's answers as (ids, labels) (labels: the id on the answer's tokens, else IGNORE),
    with its (better, worse) pairs and the record's margin."""

    seqs: list[tuple[list[int], list[int]]]
    pairs: list[tuple[int, int]]
    margin: float


def encode_rankings(rankings: list[Ranking], tokenizer: Tokenizer, template: Template,
                    max_len: int) -> tuple[list[Encoded], int]:
    """Encoded prompts, and how many were dropped because an answer had no token left in `max_len`."""
    out, dropped = [], 0
    for r in rankings:
        seqs = []
        for answer in r.responses:
            ids, trainable = encode_answer(tokenizer, template, r.conv, answer, max_len)
            seqs.append((ids, [t if keep else IGNORE for t, keep in zip(ids, trainable)]))
        if any(all(t == IGNORE for t in labels[1:]) for _, labels in seqs):
            dropped += 1
            continue
        out.append(Encoded(seqs, r.pairs(), r.margin))
    return out, dropped


def preference_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Every answer of `items` as one padded batch (ids + mask for a reward model; x, y for
    log-probabilities), plus the pairs as row indices, each weighted 1 / (its prompt's pairs)."""
    seqs = [s for it in items for s in it.seqs]
    ids, mask = pad_batch([s[0] for s in seqs], pad_id)
    pairs, weight, margin, offset = [], [], [], 0
    for it in items:
        pairs += [(offset + i, offset + j) for i, j in it.pairs]
        weight += [1.0 / len(it.pairs)] * len(it.pairs)
        margin += [it.margin] * len(it.pairs)
        offset += len(it.seqs)
    return {"ids": ids, "mask": mask, **collate(seqs, pad_id), "pairs": torch.tensor(pairs, dtype=torch.long),
            "pair_weight": torch.tensor(weight), "margin": torch.tensor(margin), "prompts": torch.tensor(len(items))}


def load_preferences(cfg: PreferenceConfig, tokenizer: Tokenizer, max_len: int,
                     dist: Dist) -> tuple[Template, list[Encoded], list[Encoded]]:
    """Read, split (when --val is not given) and encode the preference records."""
    data = read_examples(cfg, cfg.val, tokenizer, max_len, read_preferences, encode_rankings,
                         "JSONL preference records", f"an answer has no token left within {max_len} tokens", dist)
    template, train, val = data.template, data.train, data.val
    n_pairs = sum(len(e.pairs) for e in train)
    dist.say(f"preferences: {len(train)} training prompts ({n_pairs} pairs), {len(val)} validation, "
             f"template {template.name}")
    return template, train, val


class PreferenceTask(TaskMetrics):
    """The seeded order over prompts and the running training metrics; subclasses add the loss."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, train: list[Encoded], val: list[Encoded], pad_id: int, seed: int, batch_size: int) -> None:
        self.train, self.val, self.pad, self.batch_size = train, val, pad_id, batch_size
        self.order = EpochOrder(len(train), seed)
        self.windows_per_epoch = len(train)

    def indices(self, first: int, count: int) -> list[int]:
        return [self.order(k) for k in range(first, first + count)]

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        return preference_batch([self.train[i] for i in self.indices(first, count)], self.pad)

    def val_batches(self):
        for i in range(0, len(self.val), self.batch_size):
            yield i, preference_batch(self.val[i:i + self.batch_size], self.pad)
