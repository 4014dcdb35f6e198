"""Batches from token sequences: padding, packing, shifted targets, and BERT's masking."""

from __future__ import annotations

import torch

IGNORE = -100  # target value that the loss skips (prompt tokens, padding, unmasked positions)


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences: (ids [B, T], attention mask [B, T] with 1 on real tokens)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate examples into rows of at most `max_len` tokens."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for e_ids, e_labels in examples:
        if ids and len(ids) + len(e_ids) > max_len:
            rows.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + e_ids, labels + e_labels
    if ids:
        rows.append((ids, labels))
    return rows


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; inputs are ids[:-1], targets the labels shifted by one."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, :len(r_ids)] = torch.tensor(r_ids)
        labels[i, :len(r_labels)] = torch.tensor(r_labels)
    return {"x": ids[:, :-1], "y": labels[:, 1:]}


def mask_tokens(x: torch.Tensor, generator: torch.Generator, mask_id: int, vocab: int, special: torch.Tensor,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: pick `rate` of the (non-special) tokens as targets; replace 80% of them
    with the mask token, 10% with a random token, and leave 10% unchanged. Returns (inputs, targets)
    with targets -100 where nothing is to be predicted."""
    u = torch.rand(x.shape, generator=generator)
    chosen = (u < rate) & ~torch.isin(x, special)
    how = torch.rand(x.shape, generator=generator)
    random_ids = torch.randint(0, vocab, x.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, x, torch.full_like(x, -100))


def collate_seq2seq(pairs: list[tuple[list[int], list[int]]], pad_id: int,
                    decoder_start_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (source, target) pairs for an encoder-decoder: `input_ids` and `attention_mask`
    for the encoder; `decoder_input_ids`, the target shifted right behind `decoder_start_id` (what
    the decoder reads, teacher-forced); `labels`, the target itself with -100 on padding."""
    src = [s for s, _ in pairs]
    tgt = [list(t) for _, t in pairs]
    input_ids, attention_mask = pad_batch(src, pad_id)
    decoder_input_ids = pad_batch([([decoder_start_id] + t)[:len(t)] for t in tgt], pad_id)[0]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "labels": pad_batch(tgt, IGNORE)[0]}
