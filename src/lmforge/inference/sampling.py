"""Turning next-token logits into a choice: temperature, top-k, top-p and repetition penalties."""

from __future__ import annotations

import torch

from ..core.config import check
from ..core.errors import LMForgeError
from .params import SamplingParams

# The smallest temperature divided by as given: below it, float32 logits / temperature overflow to inf
# (and a temperature under 1.4e-45 is 0 in float32), whose softmax is NaN. Sampling that cold is greedy
# in all but name, and clamped to this it stays so.
MIN_TEMPERATURE = 1e-30


def validate_sampling(temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                      repetition_penalty: float = 1.0, max_new_tokens: int | None = None, n: int = 1,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> None:
    """A one-line LMForgeError for sampling settings outside their declared bounds (`SamplingParams`);
    None turns top-k, top-p and max_new_tokens (the default length) off. Checked before any output."""
    check(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty))
    if n < 1:
        raise LMForgeError(f"--num-samples must be >= 1 (got {n})")


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Next-token probabilities after temperature, then top-k, then top-p (nucleus) filtering."""
    logits = logits.float()
    if temperature <= 0:  # greedy takes the argmax of the model's own distribution
        return torch.softmax(logits, dim=-1)
    logits = logits / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays, also for a
        # top_p too small for float32, which compares as 0)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        drop[0] = False
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs /= probs.sum()
    return probs


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the text less likely (CTRL's repetition penalty, as in transformers):
    positive logits are divided by `penalty`, negative ones multiplied by it."""
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits



def penalize_counts(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logit -= presence * (count > 0) + frequency * count,
    where `counts` says how often each token was generated so far (the prompt does not count)."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)
