"""Encoders at work: sentence embeddings, semantic search, and fill-in-the-mask.

Embeddings are the mean of an encoder's final hidden states over the real (non-padding) tokens,
L2-normalised, so a dot product is a cosine similarity (the sentence-transformers recipe).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path, atomic_write
from ..core.runtime import autocast
from ..data.collate import pad_batch
from ..formats.kinds import Kind
from ..formats.load import Loaded
from ..text.tokenizer import Tokenizer, printable

MASK_ALIASES = ("[MASK]", "<mask>", "<|mask|>")


def require_encoder(lm: Loaded, what: str) -> None:
    if not lm.kind.is_encoder:
        why = (" (a decoder predicts the next token and does not read both ways)" if lm.config.causal else
               " with its own head; use the encoder it was tuned from")
        raise LMForgeError(f"{what} needs an encoder (BERT-style) model; {lm.path} is {lm.kind.phrase}{why}")


def encode_for_encoder(lm: Loaded, texts: list[str], truncate: bool = True) -> list[list[int]]:
    """Token ids with the tokenizer's own [CLS] ... [SEP], cut to what the model can read."""
    if any(not t.strip() for t in texts):
        raise LMForgeError("empty text: nothing to encode")
    limit = min(lm.meta.get("max_seq_length") or lm.model.cfg.context_length, lm.model.cfg.context_length)
    seqs, long = lm.tokenizer.encode_with_specials(texts, limit)
    if long and not truncate:
        raise LMForgeError(f"{long} text(s) exceed the model's {limit}-token limit (drop --no-truncate to cut them)")
    if long:
        print(f"warning: {long} text(s) longer than {limit} tokens were truncated", file=sys.stderr)
    return seqs


@torch.no_grad()
def embed_texts(lm: Loaded, texts: list[str], batch_size: int = 32, truncate: bool = True) -> np.ndarray:
    """[len(texts), width] float32, each row unit length."""
    require_encoder(lm, "embed")
    seqs = encode_for_encoder(lm, texts, truncate)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch: less padding
    out = np.zeros((len(seqs), lm.model.cfg.n_embd), dtype=np.float32)
    device = lm.device
    lm.model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], lm.tokenizer.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device):
            h = lm.model.hidden(ids, attention_mask=mask).float()
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def rank(query: np.ndarray, candidates: np.ndarray) -> list[tuple[int, float]]:
    """(index, cosine similarity) of every candidate, most similar first."""
    scores = candidates @ query
    return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")]


@torch.no_grad()
def fill_mask(lm: Loaded, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each mask in `text`, the `top_k` most likely tokens: [{"token", "id", "prob", "sequence"}].
    "token" is for display (one line: partial characters as <0xNN>, control characters escaped);
    "sequence" is the text with the token filled in."""
    require_encoder(lm, "fill-mask")
    if lm.kind is not Kind.MASKED_LM:
        raise LMForgeError(f"{lm.path} has no masked-LM head (it is a bare encoder, e.g. a sentence-embedding "
                           "model); fill-mask needs one, such as BertForMaskedLM or `pretrain --objective mlm`")
    mask = lm.tokenizer.mask_token
    if mask is None:
        raise LMForgeError("the tokenizer has no mask token")
    for alias in MASK_ALIASES:  # accept the usual spellings of the mask token
        text = text.replace(alias, mask)
    if mask not in text:
        raise LMForgeError(f"the text has no mask token: write {MASK_ALIASES[0]} where a word is missing")
    tok = lm.tokenizer
    mask_id = tok.token_id(mask)
    ids = _absorb_spaces(tok, tok.encode(text, add_special_tokens=True), mask_id)
    if len(ids) > lm.model.cfg.context_length:
        raise LMForgeError(f"the text is {len(ids)} tokens long; the model reads at most {lm.model.cfg.context_length}")
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    x = torch.tensor([ids], device=lm.device)
    with autocast(lm.device):
        h = lm.model.hidden(x)[0, positions]
        probs = torch.softmax(lm.model.head(h).float(), dim=-1)
    n_real = tok.vocab_size  # padded embedding rows are never real tokens
    results = []
    for slot, pos in enumerate(positions):
        p, idx = probs[slot, :n_real].topk(min(top_k, n_real))
        options = []
        for q, t in zip(p.tolist(), idx.tolist()):
            filled = list(ids)
            filled[pos] = t
            sequence = tok.decode(filled, skip_special=True)
            piece = tok.piece(t)
            options.append({"token": printable(piece.strip(" ") or piece), "id": t, "prob": round(q, 6),
                            "sequence": sequence})
        results.append(options)
    return results


def _absorb_spaces(tok: Tokenizer, ids: list[int], mask_id: int) -> list[int]:
    """Drop a lone space token before each mask. Tokenizers whose words carry their leading space
    (byte-level BPE: " word") give the space in "new [MASK]" a token of its own, so the mask would
    stand for a word without its space: pretraining never showed that (it masks whole " word"
    tokens), and the filled sentence would read "new  word". RoBERTa's <mask> does the same."""
    out: list[int] = []
    for t in ids:
        if t == mask_id and out and out[-1] != mask_id and out[-1] not in tok.special_ids \
                and tok.decode([out[-1]]) == " ":
            out.pop()
        out.append(t)
    return out


def check_embeddings_path(path: str | Path) -> Path:
    """An output file for embeddings: FILE.npy (numpy) or FILE.json."""
    path = Path(path)
    if path.suffix not in (".npy", ".json"):
        raise LMForgeError(f"{path}: embeddings are written as FILE.npy (numpy) or FILE.json")
    return path


def write_embeddings(path: str | Path, texts: list[str], vectors: np.ndarray) -> None:
    """Write embeddings atomically: a [N, dim] float32 array (.npy) or {"texts", "embeddings"} (.json)."""
    path = check_embeddings_path(path)
    if path.suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors)
    else:
        atomic_write(path, json.dumps({"texts": texts, "embeddings": vectors.tolist()}, ensure_ascii=False))
