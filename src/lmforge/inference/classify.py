"""Using a classifier: label texts with probabilities."""

from __future__ import annotations

import torch

from ..core.errors import LMForgeError
from ..data.collate import pad_batch
from ..formats.kinds import Kind
from ..formats.load import Loaded
from ..models.transformer import Classifier
from ..text.tokenizer import Tokenizer


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int, causal: bool) -> list[list[int]]:
    """Token ids per text, at most max_len. Decoders get a closing end-of-text token, so the last
    position (the one pooled) has read the whole text; encoders get their own [CLS] ... [SEP]."""
    if causal:
        return [ids[:max_len - 1] + [tokenizer.eot_id] for ids in tokenizer.encode_batch(texts)]
    return tokenizer.encode_with_specials(texts, max_len)[0]


@torch.no_grad()
def head_outputs(model: Classifier, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """The pooled head's raw outputs for each sequence, [N, outputs] in fp32 on the CPU (padded
    batches of `batch_size`): class logits for a classifier, the reward for a reward model."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], pad_id)
        out.append(model(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def predict_probs(model: Classifier, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    return torch.softmax(head_outputs(model, seqs, pad_id, batch_size), dim=-1)


def classify_texts(lm: Loaded, texts: list[str]) -> list[dict]:
    """[{"label": best, "probs": {label: p, ...}}] per text, for a classifier model directory."""
    if lm.kind is not Kind.CLASSIFIER:
        raise LMForgeError(f"{lm.path} is not a classifier (it is {lm.kind.phrase})")
    labels = lm.meta["labels"]
    if any(not t.strip() for t in texts):
        raise LMForgeError("empty text: nothing to classify")
    seqs = encode_texts(lm.tokenizer, texts, lm.model.cfg.context_length, lm.model.cfg.causal)
    probs = predict_probs(lm.model, seqs, lm.tokenizer.pad_id)
    return [{"label": labels[int(p.argmax())], "probs": {n: round(float(q), 6) for n, q in zip(labels, p)}}
            for p in probs]

