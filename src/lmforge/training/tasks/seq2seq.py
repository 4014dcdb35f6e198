"""Encoder-decoder objectives. On raw text (`NoisingTask`): T5's span corruption and BART's text
infilling, each example a window of the token stream noised from a seed of its own. On input ->
target pairs (`PairsTask`): `pretrain --objective seq2seq` from scratch and `finetune seq2seq`.

The loss is always the decoder's, on target tokens only: the source is read, never predicted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...core.errors import LMForgeError
from ...core.runtime import Dist
from ...data.collate import IGNORE, collate_seq2seq
from ...data.noising import span_corrupt, span_corruption_lengths, text_infill
from ...data.records import read_pairs
from ...data.tokens import EpochOrder, TokenData, eval_batches
from ...formats.kinds import Kind
from ...inference.generate import encode_text
from ...inference.seq2seq import translate
from ...text.tokenizer import Tokenizer
from ..config import Seq2SeqConfig
from ..finetune import default_lr, hold_out, make_saver, prepare, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir
from .lm import LMTask, _share, _sum_over_ranks, _zeros

Noise = Callable[[list[int], np.random.Generator], tuple[list[int], list[int]]]
DEFAULT_RATE = {"mlm": 0.15, "span": 0.15, "denoise": 0.3}  # BERT's, T5's noise density, BART's mask ratio


def make_noise(objective: str, tokenizer: Tokenizer, rate: float, span_length: float) -> Noise:
    """(text ids, rng) -> (source, target), both ending in end-of-text: span corruption with the
    tokenizer's sentinels, or text infilling with its mask token."""
    eos = tokenizer.eot_id
    if objective == "span":
        sentinels = tokenizer.sentinel_ids()
        if not sentinels:
            raise LMForgeError("--objective span needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the "
                               "tokenizer (pretrain adds them to one it trains)")
        return partial(span_corrupt, sentinels=sentinels, eos_id=eos, noise_density=rate,
                       mean_noise_span_length=span_length)
    if tokenizer.mask_token is None:
        raise LMForgeError("--objective denoise needs a tokenizer with a mask token (<mask>, [MASK] or <|mask|>)")
    mask_id = tokenizer.token_id(tokenizer.mask_token)

    def infill(ids: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        src, tgt = text_infill(ids, rng, mask_id, rate, span_length)
        return src + [eos], tgt + [eos]

    return infill


def text_length(objective: str, context_length: int, rate: float, span_length: float) -> int:
    """Tokens of text per example, so that the source fits `context_length`: span corruption
    shortens its input (T5's rule: 568 tokens of text give inputs of 512), text infilling's target
    is the whole text plus end-of-text."""
    if objective == "span":
        return span_corruption_lengths(context_length, rate, span_length)[0]
    return context_length - 1


def seq2seq_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """The decoder's cross-entropy on `batch`'s labels (a `collate_seq2seq` batch), teacher-forced."""
    return model(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"], reduction=reduction)


class NoisingTask(LMTask):
    """Span corruption or text infilling on windows of the token stream (LMTask's windows, order
    and validation split). Example k is noised from the seed (run seed, k), validation window s
    from (run seed, s): the same noise after a resume and on any number of processes."""

    def __init__(self, data: TokenData, length: int, seed: int, noise: Noise, pad_id: int, start_id: int,
                 eval_windows: int, batch_size: int, dist: Dist | None = None) -> None:
        super().__init__(data, length - 1, seed, [], eval_windows, batch_size, dist)  # windows of `length` tokens
        self.noise, self.pad, self.start, self.seed = noise, pad_id, start_id, seed

    def _collate(self, x: torch.Tensor, y: torch.Tensor, keys: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
        pairs = [self.noise(row, np.random.default_rng([self.seed, key])) for row, key in zip(rows, keys)]
        return collate_seq2seq(pairs, self.pad, self.start)

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        return self._collate(*self.stream.batch(first, count), list(range(first, first + count)))

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        n = int((batch["labels"] != IGNORE).sum())  # the mean is per target token: weight by their number
        return seq2seq_loss(model, batch), n, batch["input_ids"].shape[0] * (self.ctx + 1)

    def evaluate(self, model) -> dict[str, float]:
        if len(self.val) < 2:
            return {}
        device = next(model.parameters()).device
        sums = _zeros(2, device)  # nats, target tokens
        for b in eval_batches(self.val, self.ctx, self.batch_size, self.eval_windows, *_share(self.dist)):
            batch = {k: v.to(device) for k, v in self._collate(b.x, b.y, b.starts).items()}
            losses = seq2seq_loss(model, batch, reduction="none")
            if b.counted:
                sums[0] += losses.sum()
                sums[1] += (batch["labels"] != IGNORE).sum()
        nats, n = _sum_over_ranks(sums, self.dist)
        return {"val_loss": round(nats / n, 6)} if n else {}


def encode_pairs(tokenizer: Tokenizer, inputs: list[str], targets: list[str],
                 max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(source ids, target ids) per pair (`encode_text`), each cut to `max_len`; and how many were cut."""
    pairs, cut = [], 0
    for src, tgt in zip(inputs, targets):
        (s, s_cut), (t, t_cut) = encode_text(tokenizer, src, max_len), encode_text(tokenizer, tgt, max_len)
        pairs.append((s, t))
        cut += s_cut or t_cut
    return pairs, cut


@torch.no_grad()
def pairs_loss(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, start_id: int,
               batch_size: int = 8) -> float:
    """Mean loss per target token over encoded pairs (teacher-forced)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in collate_seq2seq(pairs[i:i + batch_size], pad_id, start_id).items()}
        total += float(seq2seq_loss(model, b, reduction="sum"))
        count += int((b["labels"] != IGNORE).sum())
    return total / max(count, 1)


class PairsTask:
    """Input -> target pairs, in a fresh seeded order every epoch. Validation: the loss per target
    token and the exact match of greedy outputs on the first `eval_examples` validation pairs, and
    `samples` of them shown."""

    prefetch = True  # batches are pure functions of their position: the loop may build them ahead

    def __init__(self, train: list[tuple[list[int], list[int]]], val: list[tuple[list[int], list[int]]],
                 val_text: tuple[list[str], list[str]], tokenizer: Tokenizer, start_id: int, seed: int,
                 batch_size: int, eval_examples: int, samples: int) -> None:
        self.train, self.val, self.tokenizer, self.start = train, val[:eval_examples], tokenizer, start_id
        self.val_inputs, self.val_targets = (t[:eval_examples] for t in val_text)
        self.order = EpochOrder(max(len(train), 1), seed)
        self.windows_per_epoch = len(train)
        self.pad, self.batch_size, self.samples = tokenizer.pad_id, batch_size, samples

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        return collate_seq2seq([self.train[self.order(k)] for k in range(first, first + count)], self.pad,
                               self.start)

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        n = int((batch["labels"] != IGNORE).sum())
        return seq2seq_loss(model, batch), n, n + int(batch["attention_mask"].sum())

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        longest = max(len(t) for _, t in self.val) + 4  # room enough for every right answer, and its end
        predictions = translate(model, self.tokenizer, self.val_inputs, 4 * self.batch_size, longest)
        right = sum(p.strip() == t.strip() for p, t in zip(predictions, self.val_targets))
        out: dict = {"val_loss": round(pairs_loss(model, self.val, self.pad, self.start, self.batch_size), 6),
                     "val_exact_match": round(right / len(self.val), 4)}
        shown = [{"input": i[:200], "output": p[:300]} for i, p in
                 zip(self.val_inputs[:self.samples], predictions[:self.samples])]
        for s in shown:
            tqdm.write(f"  sample  {s['input'][:60]!r} -> {s['output'][:100]!r}", file=sys.stderr)
        if shown:
            out["val_samples"] = shown
        return out


Texts = tuple[list[str], list[str]]  # (inputs, targets)


def read_pair_split(data: list[str], val_data: list[str] | None, val_fraction: float, seed: int,
                    input_column: str, target_column: str) -> tuple[Texts, Texts]:
    """(training, validation) pairs: from `data` and `val_data` files, or a seeded `val_fraction`
    of `data`'s held out."""
    def read(paths: list[str]) -> list[tuple[str, str]]:
        return [p for path in paths for p in zip(*read_pairs(path, input_column, target_column))]

    train = read(data)
    train, val = (train, read(val_data)) if val_data else hold_out(train, val_fraction, seed)
    if not train:
        raise LMForgeError("no training pairs")
    return tuple(map(list, zip(*train))), (tuple(map(list, zip(*val))) if val else ([], []))


def pairs_task(cfg, tokenizer: Tokenizer, start_id: int, train: Texts, val: Texts, max_len: int,
               dist: Dist, samples: int = 3) -> PairsTask:
    """The PairsTask of a run: pairs encoded and cut to `max_len` tokens (a warning says how many
    were), validation on --eval-batches x --batch-size pairs."""
    train_pairs, cut = encode_pairs(tokenizer, *train, max_len)
    val_pairs, val_cut = encode_pairs(tokenizer, *val, max_len)
    if cut + val_cut:
        dist.say(f"warning: {cut + val_cut} pair(s) longer than {max_len} tokens were cut to fit")
    dist.say(f"sequence to sequence: {len(train_pairs):,} training pairs, {len(val_pairs):,} validation")
    return PairsTask(train_pairs, val_pairs, val, tokenizer, start_id, cfg.seed, cfg.batch_size,
                     cfg.eval_batches * cfg.batch_size, samples)


def finetune_seq2seq(cfg: Seq2SeqConfig, on_step=None) -> dict:
    return run_distributed(_finetune_seq2seq, cfg, on_step)


def _finetune_seq2seq(cfg: Seq2SeqConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist = ddp[0]
    cfg, model, tokenizer, base = prepare(cfg, dist, (Kind.SEQ2SEQ,),
                                          need="seq2seq fine-tuning needs an encoder-decoder (T5, BART)")
    if not cfg.data:
        raise LMForgeError("--data is required (input/target pairs: JSONL, CSV or TSV)")
    train, val = read_pair_split([cfg.data], [cfg.val_data] if cfg.val_data else None, cfg.val_fraction,
                                 cfg.seed, cfg.input_column, cfg.target_column)
    torch.manual_seed(cfg.seed)
    task = pairs_task(cfg, tokenizer, model.cfg.decoder_start_token_id, train, val, cfg.context_length, dist,
                      cfg.samples)
    lora = setup_lora(model, cfg)
    report_parameters(model, dist)
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    save = make_saver(model, tokenizer, base, lora, kind=Kind.SEQ2SEQ, created_by="lmforge finetune seq2seq")
    cfg.lr = default_lr(cfg, "seq2seq", model, dist)  # recorded in train_config.yaml
    return fit(model, task, cfg, Run(out, save, title=f"{out.name}: seq2seq fine-tuning"), cfg.lr,
               on_step=on_step, ddp=ddp)
