"""Text in, text out with an encoder-decoder (T5, BART): sources encoded the way training saw them,
greedy decoding of many sources at once (evaluation, validation), and one streamed output
(`lmforge generate`). Built on the model's own `encode` / `decode` and KV cache until the engine
learns encoder-decoders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast
from ..data.collate import pad_batch
from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .generate import DEFAULT_NEW_TOKENS, generate_seq2seq_ids
from .sampling import validate_sampling
from .textstream import TextStream


def encode_text(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> tuple[list[int], bool]:
    """A source or target as an encoder-decoder reads it: the tokenizer's own special tokens where
    it adds any (T5's `</s>`, BART's `<s> ... </s>`), and always an end-of-text at the end (lmforge's
    tokenizers add none). Cut to `max_len` keeping that end; returns (ids, whether it was cut)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eot_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
    if max_len is not None and len(ids) > max_len:
        return ids[:max_len - 1] + [eos], True
    return ids, False


@torch.no_grad()
def greedy_batch(model: Transformer, sources: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int) -> list[list[int]]:
    """Greedy outputs (without their stop token) for several sources at once: one padded encoder
    pass, then one decoder step per token for every row together, through the KV cache. A row
    that has stopped rides along until all have (or `max_new_tokens`)."""
    device = next(model.parameters()).device
    src, mask = (t.to(device) for t in pad_batch(sources, pad_id))
    was_training = model.training
    model.eval()
    n = len(sources)
    cache = model.new_cache(n, max(1, max_new_tokens), max_src_len=src.shape[1])
    with autocast(device):
        memory = model.encode(src, mask)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens = model.start_ids(n, device)
    out = torch.empty(n, 0, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        with autocast(device):
            h = model.decode(tokens, memory if i == 0 else None, mask if i == 0 else None, cache=cache)
        tokens = model.head(h[:, -1]).argmax(-1, keepdim=True)
        out = torch.cat([out, tokens], dim=1)
        done |= torch.isin(tokens[:, 0], stops)
        if bool(done.all()):
            break
    model.train(was_training)
    rows = []
    for row in out.tolist():
        ends = [j for j, t in enumerate(row) if t in stop_ids]
        rows.append(row[:ends[0]] if ends else row)
    return rows


def translate(model: Transformer, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32,
              max_new_tokens: int | None = None, stop_ids: set[int] | None = None) -> list[str]:
    """The greedy output text for each source text, `batch_size` sources at a time (similar
    lengths batched together: less padding). `max_new_tokens` defaults to the context length."""
    ctx = model.cfg.context_length
    max_new_tokens = min(max_new_tokens or ctx, ctx)
    sources = [encode_text(tokenizer, t, ctx)[0] for t in texts]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[str] = [""] * len(sources)
    stops = {tokenizer.eot_id} if stop_ids is None else stop_ids
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        ids = greedy_batch(model, [sources[i] for i in chunk], max_new_tokens, stops, tokenizer.pad_id)
        for i, row in zip(chunk, ids):
            outputs[i] = tokenizer.decode(row, skip_special=True)
    return outputs


def seq2seq_text(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_ids: set[int] | None = None,
                 stream: Callable[[str], None] | None = None) -> str:
    """An encoder-decoder's output text for `prompt` (its source), streamed piecewise to `stream`;
    greedy at temperature 0."""
    validate_sampling(temperature, top_k, top_p, 1.0, max_new_tokens)
    ctx = model.cfg.context_length
    src, _ = encode_text(tokenizer, prompt)
    if len(src) > ctx:
        raise LMForgeError(f"the input is {len(src)} tokens; the model reads at most {ctx}")
    steps = generate_seq2seq_ids(model, src, min(max_new_tokens or DEFAULT_NEW_TOKENS, ctx),
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 stop_ids={tokenizer.eot_id} if stop_ids is None else stop_ids)
    out = TextStream(tokenizer)
    hidden = tokenizer.special_ids - set(tokenizer.sentinel_ids())  # BART's leading <s>; sentinels are shown
    for step in steps:
        if step.token in hidden:
            continue
        piece = out.add(step.token)
        if stream is not None and piece:
            stream(piece)
    rest = out.flush()
    if stream is not None and rest:
        stream(rest)
    return out.text
