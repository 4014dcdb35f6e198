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


def evaluate_text(lm: LM, data: list[str], text_field: str = "text", batch_size: int = 8) -> dict:
    """`lmforge evaluate`: loss, perplexity, bits per byte and token count of a model on text."""
    if lm.meta.get("kind", "causal-lm") != "causal-lm":
        raise LMForgeError(f"{lm.path} is a {lm.meta['kind']}: language-model metrics do not apply")
    corpus = load_corpus(data, text_field)
    stream = encode_documents(lm.tokenizer, corpus.documents)
    with autocast(lm.device):
        return evaluate_lm(lm.model, stream, lm.model.cfg.context_length,
                           torch.tensor(lm.tokenizer.token_bytes()), batch_size)
