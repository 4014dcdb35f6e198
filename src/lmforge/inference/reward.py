"""Using a reward model: how good is an answer to a conversation, as one number."""

from __future__ import annotations

import torch

from ..core.errors import LMForgeError
from ..data.preferences import encode_answer
from ..formats.kinds import Kind
from ..formats.load import Loaded
from ..models.transformer import Classifier
from ..text.templates import Template, template_from_json
from .classify import head_outputs


def check_reward_model(lm: Loaded) -> None:
    if lm.kind is not Kind.REWARD:
        raise LMForgeError(f"{lm.path} is not a reward model (it is {lm.kind.phrase}); train one with lmforge align "
                           "reward")


def rewards(model: Classifier, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """The scalar head's output at each sequence's last token, [N] in fp32 on the CPU."""
    return head_outputs(model, seqs, pad_id, batch_size)[:, 0]


def score_answers(lm: Loaded, convs: list[list[dict]], answers: list[str], template: Template | None = None,
                  batch_size: int = 16) -> list[float]:
    """The reward of each answer to its conversation, rendered with the reward model's template."""
    check_reward_model(lm)
    template = template or template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
    seqs = [encode_answer(lm.tokenizer, template, conv, a, lm.model.cfg.context_length)[0]
            for conv, a in zip(convs, answers)]
    was_training = lm.model.training
    lm.model.eval()
    try:
        return rewards(lm.model, seqs, lm.tokenizer.pad_id, batch_size).tolist()
    finally:
        lm.model.train(was_training)
