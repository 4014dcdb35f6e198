"""What kind of model a directory holds, as one type: the "kind" field of config.json.

Every "can this model do X?" question is answered here, so no module compares kind strings.
"""

from __future__ import annotations

from enum import Enum

from ..core.errors import LMForgeError


class Kind(str, Enum):
    CAUSAL_LM = "causal-lm"  # a decoder: predicts the next token (generate, chat, fine-tune)
    MASKED_LM = "masked-lm"  # a BERT-style encoder with its masked-token head (fill-mask, embed)
    ENCODER = "encoder"  # a bare encoder, e.g. a sentence-embedding model (embed)
    CLASSIFIER = "classifier"  # a body plus a class head (classify)
    REWARD = "reward"  # a body plus a scalar head on the last token: a reward model (score, align rlhf)
    SEQ2SEQ = "seq2seq"  # an encoder-decoder (T5, BART): reads a source, writes a target

    @property
    def generates(self) -> bool:
        return self is Kind.CAUSAL_LM

    @property
    def writes_text(self) -> bool:
        """Whether it writes text from a prompt: a decoder continues it, an encoder-decoder answers it."""
        return self in (Kind.CAUSAL_LM, Kind.SEQ2SEQ)

    @property
    def is_encoder(self) -> bool:
        return self in (Kind.MASKED_LM, Kind.ENCODER)

    @property
    def pooled_head(self) -> bool:
        """A body whose language-model head is replaced by a head on one pooled hidden state."""
        return self in (Kind.CLASSIFIER, Kind.REWARD)

    @property
    def has_lm_head(self) -> bool:
        """Whether it gives a distribution over tokens (language-model metrics apply)."""
        return self in (Kind.CAUSAL_LM, Kind.MASKED_LM)

    def __str__(self) -> str:
        return self.value

    @property
    def phrase(self) -> str:
        """The kind in words, with its article, for messages: "an encoder", "a reward model"."""
        return {Kind.CAUSAL_LM: "a language model (causal-lm)", Kind.MASKED_LM: "a masked language model",
                Kind.ENCODER: "an encoder", Kind.CLASSIFIER: "a classifier", Kind.REWARD: "a reward model",
                Kind.SEQ2SEQ: "a sequence-to-sequence model (encoder-decoder)"}[self]


def kind_of(meta: dict) -> Kind:
    """The kind recorded in a config.json (older directories without one hold a causal LM)."""
    value = meta.get("kind", Kind.CAUSAL_LM.value)
    try:
        return Kind(value)
    except ValueError:
        raise LMForgeError(f"unknown model kind {value!r} in config.json") from None


def is_adapter(meta: dict) -> bool:
    """A LoRA adapter directory: adapter weights plus a reference to its base model."""
    return "lora" in meta


def require(meta: dict, where: str, what: str, ok) -> Kind:
    """The kind, or a one-line error saying that `what` needs a model for which `ok(kind)` holds."""
    kind = kind_of(meta)
    if not ok(kind):
        raise LMForgeError(f"{what}: {where} is {kind.phrase}")
    return kind
