"""Automatic prefix caching: the keys and values of token prefixes already seen, reused by requests
that start the same way (a chat resending its history, RAG prompts sharing instructions, few-shot
evaluation, agents resending their transcript).

Block hashing, as vLLM does it: a prompt is cut into blocks of `block` tokens, and block i is keyed
by a digest of block i's tokens and block i-1's key, so one key stands for the whole prefix up to
the end of its block. A new request walks its blocks from the start and reuses the longest run
found; only the rest is prefilled. We chose blocks over a radix tree (SGLang): lookups and
eviction are a dictionary and an LRU order, nothing to rebalance, and the engine keeps its
contiguous per-slot cache (blocks are copied into a slot, which costs far less than computing
them). Children are touched before their parents, so least-recently-used eviction takes the ends
of prefixes first and never strands a long tail behind an evicted parent.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..core.runtime import available_memory
from ..models.cache import KVCache

MAX_DEFAULT_BYTES = 4 << 30


def default_bytes(device: torch.device | str) -> int:
    """The default bound: a quarter of the memory free now on the cache's device, at most 4 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory() or (2 << 30)
    return int(min(free // 4, MAX_DEFAULT_BYTES))


@dataclass
class PrefixStats:
    lookups: int = 0  # requests that asked
    prompt_tokens: int = 0  # their prompt tokens
    hit_tokens: int = 0  # of those, served from the cache
    stored_blocks: int = 0  # blocks inserted so far
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixCache:
    """KV blocks keyed by the token prefix they complete, least recently used evicted first once
    they would take more than `max_bytes`."""

    def __init__(self, max_bytes: int | None = None, block: int = 16, device: torch.device | str = "cpu") -> None:
        """`max_bytes` None: `default_bytes(device)`."""
        max_bytes = default_bytes(device) if max_bytes is None else max_bytes
        if block < 1:
            raise ValueError("block must be at least one token")
        self.block, self.max_bytes = block, max_bytes
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> [2, layers, kv heads, block, hd]
        self.bytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: list[int], limit: int | None = None) -> list[bytes]:
        """The keys of the full blocks of `tokens` (at most `limit` of them), each naming its whole prefix."""
        return list(self._keys(tokens, limit))

    def _keys(self, tokens: list[int], limit: int | None = None) -> Iterator[bytes]:
        """The same, one at a time: a lookup stops hashing at its first miss."""
        n = len(tokens) // self.block if limit is None else min(limit, len(tokens) // self.block)
        arr = np.asarray(tokens[:n * self.block], dtype=np.int64)
        parent = b""
        for i in range(n):
            block = arr[i * self.block:(i + 1) * self.block].tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            yield parent

    def load(self, prompt: list[int], cache: KVCache, slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into row `slot` of `cache`; returns its length.
        At least one prompt token is always left to compute (its logits start the answer)."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(prompt)
        found = []
        for key in self._keys(prompt, (len(prompt) - 1) // self.block):
            blk = self._blocks.get(key)
            if blk is None:
                break
            found.append((key, blk))
        for key, _ in reversed(found):  # children first: the parents end up most recently used
            self._blocks.move_to_end(key)
        for i, (_, blk) in enumerate(found):
            span = slice(i * self.block, (i + 1) * self.block)
            for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
                k[slot, :, span] = blk[0, layer]
                v[slot, :, span] = blk[1, layer]
        hit = len(found) * self.block
        self.stats.hit_tokens += hit
        return hit

    def store(self, tokens: list[int], cache: KVCache, slot: int) -> None:
        """Keep the full blocks of `tokens`, whose keys and values row `slot` of `cache` holds. Room is
        made by evicting other prefixes' blocks, never this one's: when only its own blocks are left
        to evict, its remaining (deeper) blocks are not kept, so no kept block loses its parent."""
        keys = self.keys(tokens)
        chain: set[bytes] = set()
        try:
            for i, key in enumerate(keys):
                chain.add(key)
                if key in self._blocks:
                    continue
                span = slice(i * self.block, (i + 1) * self.block)
                blk = torch.stack([torch.stack([k[slot, :, span] for k in cache.k]),
                                   torch.stack([v[slot, :, span] for v in cache.v])])
                size = blk.numel() * blk.element_size()
                while self.bytes + size > self.max_bytes:
                    victim = next(iter(self._blocks), None)
                    if victim is None or victim in chain:
                        return
                    old = self._blocks.pop(victim)
                    self.bytes -= old.numel() * old.element_size()
                    self.stats.evicted_blocks += 1
                self._blocks[key] = blk
                self.bytes += size
                self.stats.stored_blocks += 1
        finally:
            for key in reversed(keys):  # as in load: parents more recent than their children
                if key in self._blocks:
                    self._blocks.move_to_end(key)

    def clear(self) -> None:
        """Forget everything (e.g. after the weights changed)."""
        self._blocks.clear()
        self.bytes = 0
