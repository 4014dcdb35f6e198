"""`lmforge finetune classify`: texts with labels (spam / not spam, ...) -> a classifier.

The base model's body reads the text; a new linear head maps one pooled hidden state (the last
token for decoders) to class logits. Train the head only, the last N blocks, everything, or
LoRA adapters plus the head.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.errors import LMForgeError
from ...core.runtime import Dist
from ...data.collate import pad_batch
from ...data.records import read_labelled
from ...data.tokens import EpochOrder
from ...formats.kinds import Kind
from ...inference.classify import encode_texts, predict_probs
from ...models.transformer import Classifier
from ..config import ClassifyConfig
from ..finetune import default_lr, make_saver, prepare, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir


def classification_metrics(preds: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix [gold][pred]."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for p, g in zip(preds, gold):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        predicted = sum(confusion[g][c] for g in range(n))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": actual}
        f1s.append(f1)
    accuracy = sum(confusion[c][c] for c in range(n)) / max(len(gold), 1)
    return {"accuracy": round(accuracy, 4), "macro_f1": round(sum(f1s) / n, 4), "per_class": per_class,
            "confusion": confusion}


class ClassifyTask:
    prefetch = True  # batches are pure functions of their position: the loop may build them ahead

    def __init__(self, train, val, labels, pad_id, seed, class_weights, batch_size):
        self.train, self.val, self.labels, self.pad, self.batch_size = train, val, labels, pad_id, batch_size
        self.order = EpochOrder(len(train), seed)
        self.windows_per_epoch = len(train)
        self.weights = class_weights

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        rows = [self.train[self.order(k)] for k in range(first, first + count)]
        ids, mask = pad_batch([r[0] for r in rows], self.pad)
        return {"ids": ids, "mask": mask, "labels": torch.tensor([r[1] for r in rows])}

    def loss(self, model, b) -> tuple[torch.Tensor, float, int]:
        """Per example: the class-weighted mean is sum(w[y] * loss) / sum(w[y]), so its weight is
        sum(w[y]) (the number of examples without class weights), which makes accumulated and
        multi-process steps equal to one big batch."""
        logits = model(b["ids"], b["mask"]).float()
        if self.weights is None:
            return F.cross_entropy(logits, b["labels"]), len(b["labels"]), int(b["mask"].sum())
        w = self.weights.to(logits.device)
        return F.cross_entropy(logits, b["labels"], weight=w), float(w[b["labels"]].sum()), int(b["mask"].sum())

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        probs = predict_probs(model, [s for s, _ in self.val], self.pad, self.batch_size)
        gold = torch.tensor([y for _, y in self.val])
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), gold).item()
        m = classification_metrics(probs.argmax(-1).tolist(), gold.tolist(), self.labels)
        return {"val_loss": round(loss, 6), **{f"val_{k}": v for k, v in m.items()}}


def _freeze(model: Classifier, train_layers: str) -> None:
    if train_layers == "all":
        return
    if train_layers == "head":
        keep = ("head.",)
    else:
        try:
            n = int(train_layers)
        except ValueError:
            raise LMForgeError(f"--train-layers must be all, head or a number, not {train_layers!r}") from None
        if not 0 <= n <= model.cfg.n_layer:
            raise LMForgeError(f"--train-layers {n}: the model has {model.cfg.n_layer} blocks")
        first = model.cfg.n_layer - n
        keep = ("head.", "backbone.norm.") + tuple(f"backbone.blocks.{i}." for i in range(first, model.cfg.n_layer))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(keep)


def finetune_classify(cfg: ClassifyConfig, on_step=None) -> dict:
    return run_distributed(_finetune_classify, cfg, on_step)


def _finetune_classify(cfg: ClassifyConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist = ddp[0]
    cfg, body, tokenizer, base = prepare(cfg, dist, kinds=(Kind.CAUSAL_LM, Kind.MASKED_LM, Kind.ENCODER))
    if not cfg.train:
        raise LMForgeError("--train is required (a labelled .csv, .tsv or .jsonl file)")
    texts, labels = read_labelled(cfg.train, cfg.text_field, cfg.label_field)
    if cfg.val:
        val_texts, val_labels = read_labelled(cfg.val, cfg.text_field, cfg.label_field)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(len(texts), generator=g).tolist()
        n_val = int(len(texts) * cfg.val_fraction)
        val_texts, val_labels = [texts[i] for i in perm[:n_val]], [labels[i] for i in perm[:n_val]]
        texts, labels = [texts[i] for i in perm[n_val:]], [labels[i] for i in perm[n_val:]]
    names = sorted(set(labels))
    if len(names) < 2:
        raise LMForgeError(f"{cfg.train}: only one class ({names[0]!r}); classification needs at least two")
    unknown = sorted(set(val_labels) - set(names))
    if unknown:
        raise LMForgeError(f"validation labels not seen in training: {', '.join(unknown[:5])}")
    index = {n: i for i, n in enumerate(names)}
    causal = body.cfg.causal
    # auto: the last token for a decoder (it alone has read everything); the mean for an encoder
    pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if causal else "mean")
    if pooling == "last" and not causal:
        raise LMForgeError("--pooling last suits decoders; use cls or mean for an encoder")
    pad = tokenizer.pad_id
    train = list(zip(encode_texts(tokenizer, texts, cfg.context_length, causal), [index[y] for y in labels]))
    val = list(zip(encode_texts(tokenizer, val_texts, cfg.context_length, causal), [index[y] for y in val_labels]))
    weights = None
    if cfg.class_weights == "auto":
        counts = torch.bincount(torch.tensor([y for _, y in train]), minlength=len(names)).float()
        weights = len(train) / (len(names) * counts.clamp(min=1))
    torch.manual_seed(cfg.seed)
    model = Classifier(body.cfg, len(names), pooling, backbone=body)
    lora = setup_lora(model, cfg, train_also=("head.",))
    if lora is None:
        _freeze(model, cfg.train_layers)
    report_parameters(model, dist)
    counts = {n: labels.count(n) for n in names}
    dist.say(f"classification: {len(train)} training / {len(val)} validation texts, classes {counts}, "
             f"pooling {pooling}")
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    save = make_saver(model, tokenizer, base, lora, train_also=("head.",), kind=Kind.CLASSIFIER,
                      labels=names, pooling=pooling, text_field=cfg.text_field, label_field=cfg.label_field,
                      created_by="lmforge finetune classify")
    task = ClassifyTask(train, val, names, pad, cfg.seed, weights, cfg.batch_size)
    # recorded in train_config.yaml
    cfg.lr = default_lr(cfg, "classify", body, dist, head_only=cfg.train_layers == "head")
    return fit(model, task, cfg, Run(out, save, title=f"{out.name}: classification"), cfg.lr, on_step=on_step,
               ddp=ddp)
