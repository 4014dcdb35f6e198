"""Token data: documents -> one token stream on disk (memmap) -> training batches.

Encoded data is cached by content: re-running with the same text and tokenizer reuses it.
Batches are a pure function of (seed, step), so resuming and multi-process training need no
data-loader state: rank r of W takes its own slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path, atomic_write_json
from ..text.corpus import Corpus, _cache_dir
from ..text.tokenizer import Tokenizer

FORMAT_VERSION = 1
_MIN_DOCS_FOR_DOC_SPLIT = 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _encode_to_file(tokenizer: Tokenizer, docs: list[str], path: Path, desc: str) -> int:
    """Encode documents (each followed by end-of-text) straight to a binary file; returns count."""
    dtype, eot = token_dtype(tokenizer.vocab_size), tokenizer.eot_id
    total, batch = 0, 512
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=sum(len(d) for d in docs), unit="char", unit_scale=True, desc=desc,
                 disable=not sys.stderr.isatty(), leave=False) as bar:
        for i in range(0, len(docs), batch):
            chunk = docs[i:i + batch]
            ids = tokenizer.encode_batch(chunk)  # parallel in Rust
            flat = np.fromiter((t for seq in ids for t in (*seq, eot)), dtype=dtype)
            flat.tofile(f)
            total += len(flat)
            bar.update(sum(len(d) for d in chunk))
    return total


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """In-memory token stream for a (small) set of documents, each followed by end-of-text."""
    eot = tokenizer.eot_id
    ids = tokenizer.encode_batch(docs)
    return np.fromiter((t for seq in ids for t in (*seq, eot)), dtype=np.int64)


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole documents, chosen by a hash of their text (stable across runs and order).

    With too few documents to split that way, returns (docs, []) and the caller splits tokens.
    """
    if len(docs) < _MIN_DOCS_FOR_DOC_SPLIT or val_fraction <= 0:
        return docs, []
    train, val = [], []
    for d in docs:
        h = int.from_bytes(hashlib.sha1(d.encode()).digest()[:4], "little") / 2**32
        (val if h < val_fraction else train).append(d)
    if not val or not train:
        return docs, []
    return train, val


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    directory: Path


def prepare(corpus: Corpus, tokenizer: Tokenizer, val_corpus: Corpus | None = None,
            val_fraction: float = 0.05, cache_dir: Path | None = None) -> TokenData:
    """Encode a corpus into train/val token files, or reuse them if this exact input was seen."""
    h = hashlib.sha256()
    for part in (f"v{FORMAT_VERSION}", corpus.fingerprint(), tokenizer.to_str(),
                 val_corpus.fingerprint() if val_corpus else f"split:{val_fraction}"):
        h.update(part.encode())
    directory = (cache_dir or _cache_dir() / "data") / h.hexdigest()[:16]
    meta_file = directory / "meta.json"
    dtype = token_dtype(tokenizer.vocab_size)
    if meta_file.exists():
        print(f"tokenized data: cache hit ({directory})", file=sys.stderr)
    else:
        if val_corpus is not None:
            train_docs, val_docs = corpus.documents, val_corpus.documents
        else:
            train_docs, val_docs = split_documents(corpus.documents, val_fraction)
        n_train = _encode_to_file(tokenizer, train_docs, directory / "train.bin", "encoding train")
        n_val = _encode_to_file(tokenizer, val_docs, directory / "val.bin", "encoding val")
        if n_val == 0 and val_fraction > 0:  # few documents: hold out the tail of the token stream
            stream = np.fromfile(directory / "train.bin", dtype=dtype)
            cut = int(len(stream) * (1 - val_fraction))
            for name, part in (("train.bin", stream[:cut]), ("val.bin", stream[cut:])):
                with atomic_path(directory / name) as tmp:
                    part.tofile(tmp)
            n_train, n_val = cut, len(stream) - cut
        atomic_write_json(meta_file, {"format": FORMAT_VERSION, "dtype": dtype.name, "train_tokens": n_train,
                                      "val_tokens": n_val, "documents": len(corpus.documents)})
        print(f"tokenized data: {n_train:,} train + {n_val:,} val tokens ({directory})", file=sys.stderr)

    def load(name: str) -> np.ndarray:
        f = directory / name
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r")

    return TokenData(load("train.bin"), load("val.bin"), directory)


class EpochOrder:
    """An endless sequence of item indices: each epoch a fresh seeded permutation of 0..n-1.

    Item k depends only on (seed, k), so the data for any step can be recomputed: resuming
    restores nothing, and each DDP rank takes its own slice of a global batch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> int:
        epoch, i = divmod(k, self.n)
        if epoch != self._epoch:
            self._perm, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
        return int(self._perm[i])

    def epoch_of(self, k: int) -> int:
        return k // self.n


class BatchStream:
    """Training windows over a token stream, visited in a fresh random order every epoch (with
    window edges shifted per epoch, so token pairs across edges are seen too)."""

    def __init__(self, data: np.ndarray, context_length: int, seed: int) -> None:
        if len(data) < context_length + 1:
            raise LMForgeError(f"the training data has {len(data):,} tokens, fewer than one window of "
                               f"context length + 1 = {context_length + 1}; lower --context-length")
        self.data, self.ctx = data, context_length
        self.per_epoch = (len(data) - 1) // context_length
        self.order = EpochOrder(self.per_epoch, seed)
        self._shift_epoch, self._shift = -1, 0

    def _window_start(self, k: int) -> int:
        i = self.order(k)
        if self.order.epoch_of(k) != self._shift_epoch:
            slack = len(self.data) - 1 - self.per_epoch * self.ctx
            self._shift = int(np.random.default_rng([self.order.seed, self.order.epoch_of(k), 1])
                              .integers(0, min(slack, self.ctx - 1) + 1))
            self._shift_epoch = self.order.epoch_of(k)
        return self._shift + i * self.ctx

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows first .. first+count-1 as (inputs, targets), each [count, context_length]."""
        rows = [self.data[s:s + self.ctx + 1] for s in map(self._window_start, range(first, first + count))]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]


class EvalBatch(NamedTuple):
    x: torch.Tensor  # inputs [B, T]
    y: torch.Tensor  # targets [B, T]
    starts: list[int]  # where each window starts in the data: its identity, whatever the batching
    counted: bool  # False for a rank's padding batch: run it, leave it out of the sums


def eval_batches(data: np.ndarray, context_length: int, batch_size: int, max_windows: int | None = None,
                 rank: int = 0, world: int = 1) -> Iterator[EvalBatch]:
    """Non-overlapping windows covering `data` (its first `max_windows`), each token predicted once,
    stacked `batch_size` at a time (a shorter final window comes alone).

    Under torchrun, rank `rank` of `world` gets every world-th batch of that same list, so the
    windows evaluated do not depend on the number of processes. Every rank gets as many batches,
    since a sharded (FSDP) forward pass needs them all: a rank short of one repeats the first,
    marked not counted."""
    starts = list(range(0, max(len(data) - 1, 0), context_length))[:max_windows]
    full = [s for s in starts if s + context_length + 1 <= len(data)]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + context_length + 1 > len(data)]
    for k in range(-(-len(groups) // world)):
        i = k * world + rank
        group = groups[i] if i < len(groups) else groups[0]
        xy = torch.from_numpy(np.stack([data[s:s + context_length + 1] for s in group]).astype(np.int64))
        yield EvalBatch(xy[:, :-1], xy[:, 1:], group, i < len(groups))
