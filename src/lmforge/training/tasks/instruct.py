"""`lmforge finetune instruct`: teach a language model to follow instructions.

Records are Alpaca-style ({"instruction", "input", "output"}) or chat-style ({"messages": [...]})
in JSONL. Loss falls on the response tokens only (and the end-of-turn marker, so the model
learns to stop); prompt tokens get no gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ...core.runtime import Dist
from ...data.collate import IGNORE, collate, pack
from ...data.records import read_instructions
from ...data.tokens import EpochOrder
from ...inference.generate import generate_text
from ...models.lora import expand_targets
from ...text.templates import Template, encode_segments, user_text
from ...text.tokenizer import Tokenizer
from ..config import InstructConfig
from ..finetune import default_lr, make_saver, prepare, read_examples, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir


def encode_conversations(convs: list[list[dict]], tokenizer: Tokenizer, template: Template,
                         max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) per conversation, labels = ids on trainable tokens else -100, cut to max_len.

    Returns the examples and how many were dropped for having nothing left to learn."""
    examples, dropped = [], 0
    for conv in convs:
        ids, trainable = encode_segments(tokenizer, template.render(conv, tokenizer))
        ids, trainable = ids[:max_len], trainable[:max_len]
        labels = [t if keep else IGNORE for t, keep in zip(ids, trainable)]
        if not any(trainable[1:]):  # the first token is never predicted
            dropped += 1
            continue
        examples.append((ids, labels))
    return examples, dropped


def respond(model, tokenizer: Tokenizer, template: Template, conv: list[dict], max_new_tokens: int = 64) -> str:
    """The model's greedy answer to a conversation's prompt (its messages before the last answer)."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    ids, _ = encode_segments(tokenizer, template.render(conv[:last], tokenizer, add_generation_prompt=True))
    room = model.cfg.context_length - len(ids)
    if room <= 0:
        return ""
    return generate_text(model, tokenizer, "", max_new_tokens=min(max_new_tokens, room), temperature=0,
                         stop_ids=set(template.stop_tokens(tokenizer)), prompt_ids=ids)


def exact_match(model, tokenizer: Tokenizer, template: Template, convs: list[list[dict]]) -> float:
    """Share of conversations whose last assistant answer the model reproduces exactly (greedy)."""
    hits = 0
    for conv in convs:
        expected = [m for m in conv if m["role"] == "assistant"][-1]["content"]
        hits += respond(model, tokenizer, template, conv, max_new_tokens=len(tokenizer.encode(expected)) + 8).strip() \
            == expected.strip()
    return hits / max(len(convs), 1)


@torch.no_grad()
def answer_loss(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int,
                batch_size: int = 8) -> float:
    """Mean loss per response token (what instruction tuning trains on) over encoded examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        n = int((b["y"] != IGNORE).sum())
        total += float(model(b["x"].to(device), b["y"].to(device))) * n
        count += n
    return total / max(count, 1)


class InstructTask:
    prefetch = True  # batches are pure functions of their position: the loop may build them ahead

    def __init__(self, train, val, val_convs, tokenizer: Tokenizer, template: Template, seed: int,
                 batch_size: int, samples: int) -> None:
        self.train, self.val, self.val_convs = train, val, val_convs
        self.tokenizer, self.template, self.batch_size, self.samples = tokenizer, template, batch_size, samples
        self.order = EpochOrder(max(len(train), 1), seed)
        self.windows_per_epoch = len(train)
        self.pad = tokenizer.pad_id

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        return collate([self.train[self.order(k)] for k in range(first, first + count)], self.pad)

    def loss(self, model, batch) -> tuple[torch.Tensor, float, int]:
        n = int((batch["y"] != IGNORE).sum())  # the mean is per response token: weight by their number
        return model(batch["x"], batch["y"]), n, n

    def evaluate(self, model) -> dict:
        out: dict = {}
        if self.val:
            out["val_loss"] = round(answer_loss(model, self.val, self.pad, self.batch_size), 6)
        shown = []
        for conv in self.val_convs[:self.samples]:
            answer = respond(model, self.tokenizer, self.template, conv)
            prompt = next(user_text(m) for m in reversed(conv) if m["role"] == "user")
            shown.append({"prompt": prompt[:200], "response": answer[:300]})
            tqdm.write(f"  sample  {prompt[:60]!r} -> {answer[:100]!r}", file=sys.stderr)
        if shown:
            out["val_samples"] = shown
        return out


@torch.no_grad()
def frozen_head_warning(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]],
                        stop: list[int], probe: int = 16) -> str | None:
    """LoRA leaves the output layer frozen. If the base ranks the end-of-turn token far down where
    answers end (a base that never saw the chat markers learned never to predict them), adapters in
    the blocks cannot lift it: the model learns the answers but never stops. Say so up front."""
    ranks = []
    device = next(model.parameters()).device
    for ids, labels in examples[:probe]:
        ends = [j for j, t in enumerate(labels) if j > 0 and t in stop]  # token j is predicted at j - 1
        if not ends:
            continue
        h = model.hidden(torch.tensor([ids[:max(ends)]], device=device))[0]
        logits = model.head(h[[j - 1 for j in ends]]).float()  # only the rows where an answer ends
        ranks += [1 + int((row > row[labels[j]]).sum()) for row, j in zip(logits, ends)]
    median = sorted(ranks)[len(ranks) // 2] if ranks else 0
    if median <= 100:
        return None
    return (f"the base model ranks the end-of-turn token #{median} (median) where answers end, and LoRA keeps "
            "its output layer frozen: the model may learn the answers but never stop. Add lm_head to "
            "--lora-targets, or use --template alpaca (its end-of-text token is one the base knows)")


def finetune_instruct(cfg: InstructConfig, on_step=None) -> dict:
    return run_distributed(_finetune_instruct, cfg, on_step)


def _finetune_instruct(cfg: InstructConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist = ddp[0]
    cfg, model, tokenizer, base = prepare(cfg, dist)
    max_len = cfg.context_length + 1  # inputs and targets are this shifted by one
    data = read_examples(cfg, cfg.val_data, tokenizer, max_len, read_instructions, encode_conversations,
                         "JSONL records to learn from",
                         f"nothing of the response fits in {cfg.context_length} tokens", dist)
    template, convs, val_convs, train, val = data.template, data.records, data.val_records, data.train, data.val
    if cfg.pack:
        train = pack(train, max_len)
    torch.manual_seed(cfg.seed)
    stop = template.stop_tokens(tokenizer)
    if cfg.lora_rank and "lm_head" not in expand_targets(cfg.lora_targets):
        warning = dist.on_main(frozen_head_warning, model, train, stop)
        if warning:
            dist.say(f"warning: {warning}")
    lora = setup_lora(model, cfg)
    report_parameters(model, dist)
    dist.say(f"instruction tuning: {len(train)} training {'rows' if cfg.pack else 'examples'}, {len(val)} "
             f"validation, template {template.name}")
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    tooled = any(m.get("tools") or m.get("tool_calls") for conv in convs for m in conv)
    save = make_saver(model, tokenizer, base, lora, chat_template=template.to_json(), stop_token_ids=stop,
                      created_by="lmforge finetune instruct", **({"tool_calls": True} if tooled else {}))
    task = InstructTask(train, val, val_convs, tokenizer, template, cfg.seed, cfg.batch_size, cfg.samples)
    cfg.lr = default_lr(cfg, "instruct", model, dist)  # recorded in train_config.yaml
    return fit(model, task, cfg, Run(out, save, title=f"{out.name}: instruction tuning"), cfg.lr,
               on_step=on_step, ddp=ddp)


