"""Language-model objectives: next-token prediction (LMTask) and masked-token prediction (MLMTask),
with their validation metrics (loss, bits per byte, masked accuracy)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ...core.errors import LMForgeError
from ...data.collate import mask_tokens
from ...data.tokens import BatchStream, TokenData, eval_batches
from ...text.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: np.ndarray, context_length: int, token_bytes: torch.Tensor,
                batch_size: int = 8, max_windows: int | None = None) -> dict:
    """Loss over every token of `data` (or its first `max_windows` windows)."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nats_bpb = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens, n_bytes = 0, 0
    was_training = model.training
    model.eval()
    for x, y in eval_batches(data, context_length, batch_size, max_windows):
        x, y = x.to(device), y.to(device)
        loss = model(x, y, reduction="none").flatten()  # per token, chunked: never [B, T, vocab] logits
        nb = token_bytes[y.flatten()]
        nats += loss.sum().double()
        nats_bpb += (loss * (nb > 0)).sum().double()  # special tokens carry no bytes: left out
        n_tokens += y.numel()
        n_bytes += int(nb.sum())
    model.train(was_training)
    if n_tokens == 0:
        raise LMForgeError("nothing to evaluate: the data has fewer than 2 tokens")
    loss = nats.item() / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": nats_bpb.item() / math.log(2) / max(n_bytes, 1), "tokens": n_tokens}


def masked_eval_batches(data: np.ndarray, context_length: int, mask_id: int, vocab: int, special: torch.Tensor,
                        batch_size: int = 8, max_windows: int | None = None,
                        seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of `eval_batches`' windows, masked the same (seeded) way every time."""
    g = torch.Generator().manual_seed(seed)
    for x, _ in eval_batches(data, context_length, batch_size, max_windows):
        yield mask_tokens(x, g, mask_id, vocab, special)


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, data: np.ndarray, context_length: int, mask_id: int, vocab: int,
                 special: torch.Tensor, batch_size: int = 8, max_windows: int | None = None, seed: int = 0) -> dict:
    """Masked-token loss and accuracy, with the same (seeded) masking every time it is run. Only the
    masked positions reach the output layer, and through the loss path's chunks (`score_targets`):
    no [B, T, vocab] logits, nor even [masked, vocab]."""
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    correct, n = torch.zeros((), dtype=torch.long, device=device), 0
    was_training = model.training
    model.eval()
    for inputs, targets in masked_eval_batches(data, context_length, mask_id, vocab, special, batch_size,
                                               max_windows, seed):
        sel = targets != -100
        if not sel.any():
            continue
        t = targets[sel].to(device)
        losses, top = model.score_targets(model.hidden(inputs.to(device))[sel.to(device)], t)
        nats += losses.sum().double()
        correct += (top == t).sum()
        n += int(sel.sum())
    model.train(was_training)
    if n == 0:
        raise LMForgeError("nothing to evaluate: no maskable tokens in the data")
    return {"masked_loss": nats.item() / n, "masked_accuracy": int(correct) / n, "masked_tokens": n}


class LMTask:
    """Next-token prediction on a token stream."""

    prefetch = True  # batches are pure functions of their position: the loop may build them ahead

    def __init__(self, data: TokenData, context_length: int, seed: int, token_bytes: list[int],
                 eval_windows: int, batch_size: int) -> None:
        self.stream = BatchStream(data.train, context_length, seed)
        self.windows_per_epoch = self.stream.per_epoch
        self.val, self.ctx, self.eval_windows, self.batch_size = data.val, context_length, eval_windows, batch_size
        self.token_bytes = torch.tensor(token_bytes)

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        x, y = self.stream.batch(first, count)
        return {"x": x, "y": y}

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        n = batch["y"].numel()
        return model(batch["x"], batch["y"]), n, n

    def evaluate(self, model) -> dict[str, float]:
        if len(self.val) < 2:
            return {}
        r = evaluate_lm(model, self.val, self.ctx, self.token_bytes, self.batch_size, self.eval_windows)
        return {"val_loss": round(r["loss"], 6), "val_bpb": round(r["bits_per_byte"], 6)}


class MLMTask(LMTask):
    """Masked-token prediction on the same windows: BERT's 80/10/10 corruption, seeded per batch so
    that a resumed or multi-process run sees exactly the same masks."""

    def __init__(self, data: TokenData, context_length: int, seed: int, tokenizer: Tokenizer, rate: float,
                 eval_windows: int, batch_size: int) -> None:
        super().__init__(data, context_length, seed, [], eval_windows, batch_size)
        mask = tokenizer.mask_token
        if mask is None:
            raise LMForgeError("--objective mlm needs a tokenizer with a mask token ([MASK], <mask> or <|mask|>)")
        self.mask_id, self.vocab, self.rate, self.seed = tokenizer.token_id(mask), tokenizer.vocab_size, rate, seed
        self.special = torch.tensor(sorted(tokenizer.special_ids))

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        x, _ = self.stream.batch(first, count)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + first)
        inputs, targets = mask_tokens(x, g, self.mask_id, self.vocab, self.special, self.rate)
        return {"x": inputs, "y": targets}

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        # the mean is over the masked tokens; every token was read (as --max-tokens and sizing count)
        return model(batch["x"], batch["y"]), int((batch["y"] != -100).sum()), batch["x"].numel()

    def evaluate(self, model) -> dict[str, float]:
        if len(self.val) < 2:
            return {}
        r = evaluate_mlm(model, self.val, self.ctx, self.mask_id, self.vocab, self.special, self.batch_size,
                         self.eval_windows)
        return {"val_loss": round(r["masked_loss"], 6), "val_mlm_accuracy": round(r["masked_accuracy"], 4)}

