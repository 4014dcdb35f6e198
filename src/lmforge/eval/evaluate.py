"""`lmforge evaluate`: measure a model on data, choosing the metric from the model and the data.

- a language model on text: loss, perplexity and bits per byte (tokenizer-independent: the summed
  loss in bits over the UTF-8 bytes of the predicted text, so vocabularies compare directly);
- a language model on instruction records: exact match of greedy answers, and the answer loss;
- a classifier on a labelled file: accuracy, macro-F1, per-class precision/recall, confusion;
- an encoder-decoder (T5, BART) on input/target pairs: exact match, BLEU and chrF of its greedy
  outputs, and its loss per target token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast
from ..data.records import looks_like_instructions, read_instructions, read_labelled
from ..data.tokens import encode_documents
from ..formats.kinds import Kind, require
from ..formats.load import Loaded
from ..inference.classify import classify_texts
from ..text.corpus import load_corpus
from ..text.templates import template_from_json
from ..training.tasks.classify import classification_metrics
from ..training.tasks.instruct import answer_loss, encode_conversations, exact_match
from ..training.tasks.lm import evaluate_lm, evaluate_mlm
from .seq2seq import evaluate_seq2seq


def evaluate(lm: Loaded, data: list[str], text_field: str = "text", batch_size: int = 8, *,
             input_column: str = "input", target_column: str = "target", max_new_tokens: int | None = None) -> dict:
    """The metrics that fit this model and this data (see the module docstring)."""
    if not data:
        raise LMForgeError("--data is required")
    if lm.kind is Kind.SEQ2SEQ:
        if len(data) != 1:
            raise LMForgeError("an encoder-decoder is evaluated on one file of input/target pairs (--data FILE)")
        return evaluate_seq2seq(lm, data[0], input_column, target_column, batch_size, max_new_tokens)
    if lm.kind is Kind.CLASSIFIER:
        if len(data) != 1:
            raise LMForgeError("a classifier is evaluated on one labelled file (--data FILE)")
        return evaluate_classifier(lm, data[0], text_field, lm.meta.get("label_field", "label"))
    if len(data) == 1 and looks_like_instructions(data[0]):
        return evaluate_instructions(lm, data[0])
    return evaluate_text(lm, data, text_field, batch_size)


def evaluate_text(lm: Loaded, data: list[str], text_field: str = "text", batch_size: int = 8) -> dict:
    """Loss, perplexity, bits per byte and token count of a language model on text."""
    kind = require(lm.meta, str(lm.path), "language-model metrics need a language model", lambda k: k.has_lm_head)
    corpus = load_corpus(data, text_field)
    stream = encode_documents(lm.tokenizer, corpus.documents)
    if kind is Kind.MASKED_LM:
        mask_id = lm.tokenizer.token_id(lm.tokenizer.mask_token or "")
        special = torch.tensor(sorted(lm.tokenizer.special_ids))
        with autocast(lm.device):
            return evaluate_mlm(lm.model, stream, lm.model.cfg.context_length, mask_id, lm.tokenizer.vocab_size,
                                special, batch_size)
    with autocast(lm.device):
        return evaluate_lm(lm.model, stream, lm.model.cfg.context_length,
                           torch.tensor(lm.tokenizer.token_bytes()), batch_size)


def evaluate_classifier(lm: Loaded, path: str, text_field: str | None = None, label_field: str | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix on a labelled file."""
    tf = text_field or "text"
    lf = label_field or "label"
    texts, gold = read_labelled(path, tf, lf)
    labels = lm.meta["labels"]
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise LMForgeError(f"{path}: labels the model does not know: {', '.join(unknown[:5])} (it knows "
                           f"{', '.join(labels)})")
    preds = [labels.index(r["label"]) for r in classify_texts(lm, texts)]
    result = classification_metrics(preds, [labels.index(g) for g in gold], labels)
    return {**result, "labels": labels, "examples": len(texts)}


def evaluate_instructions(lm: Loaded, path: str | Path) -> dict:
    """Exact match of greedy answers and the loss on reference answers, for instruction records."""
    require(lm.meta, str(lm.path), "exact match of generated answers needs a decoder (causal language model)",
            lambda k: k.generates)
    template = template_from_json(lm.meta.get("chat_template"), lm.tokenizer)
    template.check(lm.tokenizer)
    convs = read_instructions(path)
    examples, _ = encode_conversations(convs, lm.tokenizer, template, lm.model.cfg.context_length + 1)
    loss = round(answer_loss(lm.model, examples, lm.tokenizer.pad_id), 6) if examples else None
    return {"exact_match": round(exact_match(lm.model, lm.tokenizer, template, convs), 4), "loss": loss,
            "examples": len(convs), "template": template.name}

