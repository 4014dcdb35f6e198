"""The KV cache the inference engine and generation decode with: keys and values preallocated per
layer and row, written in place (plain, batched per-row positions, mixed steps of decode rows and
prompt chunks), and an encoder-decoder's cross-attention keys and values per row."""

from __future__ import annotations

import torch

from ..core.errors import LMForgeError
from .config import ModelConfig


class Mix:
    """One engine step that feeds decode rows and prompt chunks together (vLLM's and llama.cpp's
    mixed batches). The tokens are flattened to [1, N], so every matmul sees all N at once and the
    weights are read once per step, not once per prompt; only attention runs per part: one batched
    call for the decode rows, one call per chunk against its own row of the cache."""

    def __init__(self, rows: torch.Tensor | None, chunks: list[tuple[int, int, int]]) -> None:
        self.rows, self.chunks = rows, chunks
        self.n_rows = 0 if rows is None else rows.shape[0]
        self.span = int(rows.max()) + 1 if self.n_rows else 0  # the keys the decode rows read
        self.batch = torch.arange(self.n_rows, device=rows.device) if self.n_rows else None  # once, not per layer
        self.masks: list = []  # set by Transformer.hidden: the decode rows' mask, then each chunk's

    def positions(self, device) -> torch.Tensor:
        """Each flattened token's position [N]."""
        parts = [self.rows] if self.n_rows else []
        parts += [torch.arange(start, start + n, device=device) for _, start, n in self.chunks]
        return torch.cat(parts)

    def attend(self, cache: KVCache, layer: int, q, k, v, attend) -> torch.Tensor:
        """Write this layer's new keys and values where each part belongs, and attend part by part.
        Decode rows first: a dummy row over a chunk's row writes at the chunk's start, which the
        chunk then overwrites."""
        kc, vc, r = cache.k[layer], cache.v[layer], self.n_rows
        masks, parts = iter(self.masks), []
        if r:
            batch, span = self.batch, self.span
            kc[batch, :, self.rows] = k[0, :, :r].transpose(0, 1)
            vc[batch, :, self.rows] = v[0, :, :r].transpose(0, 1)
            y = attend(q[0, :, :r].transpose(0, 1)[:, :, None], kc[:r, :, :span], vc[:r, :, :span], next(masks))
            parts.append(y[:, :, 0].transpose(0, 1)[None])
        off = r
        for row, start, n in self.chunks:
            end = start + n
            kc[row, :, start:end] = k[0, :, off:off + n]
            vc[row, :, start:end] = v[0, :, off:off + n]
            parts.append(attend(q[:, :, off:off + n], kc[row:row + 1, :, :end], vc[row:row + 1, :, :end], next(masks)))
            off += n
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # a decode-only step: no copy


class KVCache:
    """Keys and values of past positions, preallocated for `max_len` positions per layer.

    Plain use: every row holds the same `pos` positions and new ones are appended. Batched decoding
    of rows at different lengths (`at`): each row writes its one new entry at its own position and
    attends to its first rows[b] + 1 entries (the attention mask hides the rest). A mixed step (`mix`):
    decode rows and prompt chunks of other lengths in one forward (see `Mix`).

    An encoder-decoder's cache (`max_src_len` > 0) holds its decoder layers' self-attention entries
    and, per decoder layer, the cross-attention keys and values of each row's encoder output
    (`cross_k`, `cross_v`: [batch, n_kv_head, max_src_len, head_dim]), computed once per request
    and written row by row (`store_cross`); `cross_mask` [batch, max_src_len] marks each row's real
    source positions, and attention reads the first `cross_span` of them.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, max_src_len: int = 0) -> None:
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        layers = cfg.n_decoder_layer or cfg.n_layer  # an encoder-decoder caches only its decoder
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored
        self.rows: torch.Tensor | None = None  # per-row write positions [B] (batched decoding)
        self.span = 0  # with rows: how many leading entries the attention reads (max(rows) + 1)
        self.mixed: Mix | None = None  # set for one mixed step (see `mix`)
        self.cross_k: list[torch.Tensor] | None = None
        self.cross_v: list[torch.Tensor] | None = None
        self.cross_mask: torch.Tensor | None = None
        self._cross_span = [0]  # one list shared with every view: a view made earlier sees later sources
        if max_src_len:
            src = (batch, cfg.n_kv_head, max_src_len, cfg.head_dim)
            self.cross_k = [torch.zeros(src, device=device, dtype=dtype) for _ in range(layers)]
            self.cross_v = [torch.zeros(src, device=device, dtype=dtype) for _ in range(layers)]
            self.cross_mask = torch.zeros(batch, max_src_len, dtype=torch.bool, device=device)

    def view(self, start: int, stop: int) -> KVCache:
        """Rows start:stop, sharing this cache's storage (no copy), with pos 0."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.max_len, view.pos, view.rows, view.span, view.mixed = self.max_len, 0, None, 0, None
        view.cross_k = view.cross_v = view.cross_mask = None
        view._cross_span = self._cross_span
        if self.cross_k is not None:
            view.cross_k, view.cross_v = [k[start:stop] for k in self.cross_k], [v[start:stop] for v in self.cross_v]
            view.cross_mask = self.cross_mask[start:stop]
        return view

    def mix(self, rows: torch.Tensor | None, chunks: list[tuple[int, int, int]]) -> KVCache:
        """Set up one mixed step over flattened tokens [1, N]: the first len(rows) tokens decode one
        token each in rows 0.. at positions `rows` (as `at`), then each chunk (row, start, length)
        feeds `length` prompt tokens of one row from position `start`. Cleared after the forward."""
        self.mixed = Mix(rows, chunks)
        return self

    def store_cross(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                    rows: torch.Tensor | None = None) -> None:
        """Write each decoder layer's cross-attention (k, v) [b, n_kv_head, S, head_dim] of `b`
        encoder outputs into cache rows `rows` (default 0..b-1); `mask` [b, S]: real source tokens."""
        b, S = mask.shape
        if self.cross_k is None or S > self.cross_mask.shape[1]:
            room = 0 if self.cross_k is None else self.cross_mask.shape[1]
            raise LMForgeError(f"the cache holds encoder outputs of at most {room} tokens (got {S})")
        rows = torch.arange(b, device=mask.device) if rows is None else rows
        for layer, (k, v) in enumerate(kv):
            self.cross_k[layer][rows, :, :S] = k
            self.cross_v[layer][rows, :, :S] = v
        self.cross_mask[rows] = False
        self.cross_mask[rows, :S] = mask.bool()
        self._cross_span[0] = max(self._cross_span[0], S)

    @property
    def cross_span(self) -> int:
        """How many leading source positions cross-attention reads: the longest source stored, or
        what the engine sets for one step (the longest source of the rows decoding now)."""
        return self._cross_span[0]

    @cross_span.setter
    def cross_span(self, n: int) -> None:
        self._cross_span[0] = n

    def at(self, rows: torch.Tensor, span: int) -> KVCache:
        """Set up one batched decoding step: row b writes position rows[b]; span = max(rows) + 1."""
        self.rows, self.span = rows, span
        self._batch = torch.arange(rows.shape[0], device=rows.device)
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is not None:
            self.k[layer][self._batch, :, self.rows] = k[:, :, 0]
            self.v[layer][self._batch, :, self.rows] = v[:, :, 0]
            return self.k[layer][:, :, :self.span], self.v[layer][:, :, :self.span]
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise LMForgeError(f"KV cache full: {end} positions exceed its {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (e.g. to reuse a shared prompt)."""
        self.pos = min(self.pos, length)
