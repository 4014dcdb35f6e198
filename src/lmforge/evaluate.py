"""Language-model evaluation: loss, perplexity and bits per byte on held-out text.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted text, so it
does not depend on the tokenizer: runs with different vocabularies compare directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .api import LM
from .corpus import load_corpus
from .data import encode_documents, eval_batches
from .errors import LMForgeError
from .runtime import autocast


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
        logits = model(x).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
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


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, data: np.ndarray, context_length: int, mask_id: int, vocab: int,
                 special: torch.Tensor, batch_size: int = 8, max_windows: int | None = None, seed: int = 0) -> dict:
    """Masked-token loss and accuracy, with the same (seeded) masking every time it is run."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    nats, correct, n = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for x, _ in eval_batches(data, context_length, batch_size, max_windows):
        inputs, targets = mask_tokens(x, g, mask_id, vocab, special)
        sel = targets != -100
        if not sel.any():
            continue
        h = model.hidden(inputs.to(device))[sel.to(device)]
        logits = model.head(h).float()
        t = targets[sel].to(device)
        nats += F.cross_entropy(logits, t, reduction="sum").item()
        correct += int((logits.argmax(-1) == t).sum())
        n += int(sel.sum())
    model.train(was_training)
    if n == 0:
        raise LMForgeError("nothing to evaluate: no maskable tokens in the data")
    return {"masked_loss": nats / n, "masked_accuracy": correct / n, "masked_tokens": n}


def evaluate_text(lm: LM, data: list[str], text_field: str = "text", batch_size: int = 8) -> dict:
    """`lmforge evaluate`: loss, perplexity, bits per byte and token count of a model on text."""
    kind = lm.meta.get("kind", "causal-lm")
    if kind not in ("causal-lm", "masked-lm"):
        raise LMForgeError(f"{lm.path} is a {kind}: language-model metrics do not apply")
    corpus = load_corpus(data, text_field)
    stream = encode_documents(lm.tokenizer, corpus.documents)
    if kind == "masked-lm":
        mask_id = lm.tokenizer.token_id(lm.tokenizer.mask_token or "")
        special = torch.tensor(sorted(lm.tokenizer.special_ids))
        with autocast(lm.device):
            return evaluate_mlm(lm.model, stream, lm.model.cfg.context_length, mask_id, lm.tokenizer.vocab_size,
                                special, batch_size)
    with autocast(lm.device):
        return evaluate_lm(lm.model, stream, lm.model.cfg.context_length,
                           torch.tensor(lm.tokenizer.token_bytes()), batch_size)
