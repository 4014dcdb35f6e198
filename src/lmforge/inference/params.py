"""The sampling settings, declared once with their bounds: the library checks them with
`core.config.check`, and the CLI derives `generate`'s and `chat`'s flags from the same fields.
Torch-free, so the CLI can build its flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import arg


@dataclass
class SamplingParams:
    """Sampling: how each next token is chosen"""

    max_new_tokens: int | None = arg(None, "most new tokens to generate (default: 200, or as many as fit in the "
                                     "context window)", ge=1)
    temperature: float = arg(0.8, "randomness: 0 = greedy (always the most likely token), 1 = the model's own "
                             "distribution, higher = wilder", ge=0)
    top_k: int | None = arg(None, "sample only among the K most likely tokens", ge=1)
    top_p: float | None = arg(None, "sample only among the most likely tokens whose probabilities sum to P "
                              "(0 < P <= 1)", gt=0, le=1)
    seed: int | None = arg(None, "random seed: the same seed gives the same text")
    repetition_penalty: float = arg(1.0, "above 1 makes tokens already in the text less likely (1.1-1.3 curbs "
                                    "loops in small models)", gt=0)
    presence_penalty: float = arg(0.0, "subtract this from the logit of every token already generated (OpenAI's "
                                  "presence penalty, -2..2)", ge=-2, le=2)
    frequency_penalty: float = arg(0.0, "subtract this times its count so far from the logit of every generated "
                                   "token (OpenAI's frequency penalty, -2..2)", ge=-2, le=2)
