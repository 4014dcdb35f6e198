"""Language-model objectives: next-token prediction (LMTask) and masked-token prediction (MLMTask),
with their validation metrics (loss, bits per byte, masked accuracy)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ...core.errors import LMForgeError
from ...core.runtime import Dist
from ...data.collate import mask_tokens
from ...data.tokens import BatchStream, TokenData, eval_batches
from ...text.tokenizer import Tokenizer


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """Running sums: float64 (their all-reduce too), except on MPS, which has none."""
    return torch.zeros(n, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


def _share(dist: Dist | None) -> tuple[int, int]:
    return (dist.rank, dist.world) if dist is not None else (0, 1)


def _sum_over_ranks(sums: torch.Tensor, dist: Dist | None) -> list[float]:
    return (dist.all_reduce_sum(sums) if dist is not None else sums).tolist()


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: np.ndarray, context_length: int, token_bytes: torch.Tensor,
                batch_size: int = 8, max_windows: int | None = None, dist: Dist | None = None) -> dict:
    """Loss over every token of `data` (or its first `max_windows` windows). Given `dist` (every
    rank calling), each rank evaluates its share of those windows and the sums are all-reduced."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    sums = _zeros(4, device)  # nats, nats of tokens with bytes, tokens, bytes
    was_training = model.training
    model.eval()
    for b in eval_batches(data, context_length, batch_size, max_windows, *_share(dist)):
        x, y = b.x.to(device), b.y.to(device)
        loss = model(x, y, reduction="none").flatten()  # per token, chunked: never [B, T, vocab] logits
        if b.counted:
            nb = token_bytes[y.flatten()]
            sums[0] += loss.sum()
            sums[1] += (loss * (nb > 0)).sum()  # special tokens carry no bytes: left out
            sums[2] += y.numel()
            sums[3] += nb.sum()
    model.train(was_training)
    nats, nats_bpb, n_tokens, n_bytes = _sum_over_ranks(sums, dist)
    if n_tokens == 0:
        raise LMForgeError("nothing to evaluate: the data has fewer than 2 tokens")
    loss = nats / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": nats_bpb / math.log(2) / max(n_bytes, 1), "tokens": int(n_tokens)}


def masked_eval_batches(data: np.ndarray, context_length: int, mask_id: int, vocab: int, special: torch.Tensor,
                        batch_size: int = 8, max_windows: int | None = None, seed: int = 0, rank: int = 0,
                        world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(inputs, targets, counted) of `eval_batches`, each window masked from a seed of its own (the
    run's and where the window starts): the same masks every time, however the windows are batched
    or shared between ranks."""
    for b in eval_batches(data, context_length, batch_size, max_windows, rank, world):
        yield *mask_rows(b.x, b.starts, seed, mask_id, vocab, special), b.counted


def mask_rows(x: torch.Tensor, keys: list[int], seed: int, mask_id: int, vocab: int, special: torch.Tensor,
              rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_tokens` for each row of x [B, T] from a generator of its own, seeded by the run's seed
    and the row's key (its example index, or where its window starts): a row's masks do not depend
    on the rows batched with it, so one process and several (each a slice) mask alike."""
    rows = [mask_tokens(row[None], torch.Generator().manual_seed(seed * 1_000_003 + key), mask_id, vocab, special,
                        rate) for row, key in zip(x, keys)]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, data: np.ndarray, context_length: int, mask_id: int, vocab: int,
                 special: torch.Tensor, batch_size: int = 8, max_windows: int | None = None, seed: int = 0,
                 dist: Dist | None = None) -> dict:
    """Masked-token loss and accuracy, with the same (seeded) masks every time. Only the masked
    positions are scored, through the loss path (`score_targets`): no [B, T, vocab] logits. Given
    `dist`, each rank evaluates its share of the windows and the sums are all-reduced."""
    device = next(model.parameters()).device
    sums = _zeros(3, device)  # nats, right predictions, masked tokens
    was_training = model.training
    model.eval()
    for inputs, targets, counted in masked_eval_batches(data, context_length, mask_id, vocab, special, batch_size,
                                                        max_windows, seed, *_share(dist)):
        targets = targets.to(device)
        # run even with nothing masked, or uncounted: the ranks of a sharded model all take part in each pass
        losses, top = model.score_targets(inputs.to(device), targets)
        if counted:
            sums[0] += losses.sum()
            sums[1] += (top == targets[targets != -100]).sum()
            sums[2] += len(top)
    model.train(was_training)
    nats, correct, n = _sum_over_ranks(sums, dist)
    if n == 0:
        raise LMForgeError("nothing to evaluate: no maskable tokens in the data")
    return {"masked_loss": nats / n, "masked_accuracy": correct / n, "masked_tokens": int(n)}


class LMTask:
    """Next-token prediction on a token stream. Validation: the first `eval_windows` windows of the
    validation split; under torchrun (`dist`) each rank evaluates a share of them."""

    prefetch = True  # batches are pure functions of their position: the loop may build them ahead
    shares_evaluation = True  # the loop calls evaluate on every rank

    def __init__(self, data: TokenData, context_length: int, seed: int, token_bytes: list[int],
                 eval_windows: int, batch_size: int, dist: Dist | None = None) -> None:
        self.stream = BatchStream(data.train, context_length, seed)
        self.windows_per_epoch = self.stream.per_epoch
        self.val, self.ctx, self.eval_windows, self.batch_size = data.val, context_length, eval_windows, batch_size
        self.token_bytes, self.dist = torch.tensor(token_bytes), dist

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        x, y = self.stream.batch(first, count)
        return {"x": x, "y": y}

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        n = batch["y"].numel()
        return model(batch["x"], batch["y"]), n, n

    def evaluate(self, model) -> dict[str, float]:
        if len(self.val) < 2:
            return {}
        r = evaluate_lm(model, self.val, self.ctx, self.token_bytes, self.batch_size, self.eval_windows, self.dist)
        return {"val_loss": round(r["loss"], 6), "val_bpb": round(r["bits_per_byte"], 6)}


class MLMTask(LMTask):
    """Masked-token prediction on the same windows: BERT's 80/10/10 corruption, seeded per example
    so that a resumed or multi-process run sees exactly the same masks."""

    def __init__(self, data: TokenData, context_length: int, seed: int, tokenizer: Tokenizer, rate: float,
                 eval_windows: int, batch_size: int, dist: Dist | None = None) -> None:
        super().__init__(data, context_length, seed, [], eval_windows, batch_size, dist)
        mask = tokenizer.mask_token
        if mask is None:
            raise LMForgeError("--objective mlm needs a tokenizer with a mask token ([MASK], <mask> or <|mask|>)")
        self.mask_id, self.vocab, self.rate, self.seed = tokenizer.token_id(mask), tokenizer.vocab_size, rate, seed
        self.special = torch.tensor(sorted(tokenizer.special_ids))

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        x, _ = self.stream.batch(first, count)
        inputs, targets = mask_rows(x, list(range(first, first + count)), self.seed, self.mask_id, self.vocab,
                                    self.special, self.rate)
        return {"x": inputs, "y": targets}

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        # the mean is over the masked tokens; every token was read (as --max-tokens and sizing count)
        return model(batch["x"], batch["y"]), int((batch["y"] != -100).sum()), batch["x"].numel()

    def evaluate(self, model) -> dict[str, float]:
        if len(self.val) < 2:
            return {}
        r = evaluate_mlm(model, self.val, self.ctx, self.mask_id, self.vocab, self.special, self.batch_size,
                         self.eval_windows, dist=self.dist)
        return {"val_loss": round(r["masked_loss"], 6), "val_mlm_accuracy": round(r["masked_accuracy"], 4)}

