"""One transformer for every architecture lmforge supports, driven by `ModelConfig`.

GPT-2 (learned positions, LayerNorm, GELU, biases, tied embeddings), Llama/Mistral/Qwen
(RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, q/k norms) and BERT-style encoders
(bidirectional, post-LayerNorm, token types) are all settings of the same few modules.
This file knows nothing about files, the CLI or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError
from . import blas
from .config import ACTIVATIONS, ModelConfig
from .loss import linear_cross_entropy, token_losses_and_predictions


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with Llama 3 / linear context scaling."""
    hd = cfg.head_dim
    # float32 throughout, computed the way Hugging Face does, so imported models match exactly.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "factors":  # one divisor per frequency, as GGUF files carry Llama 3's scaling (rope_freqs)
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise LMForgeError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, factors)")
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of each head: the "rotate half" layout Llama checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Mix:
    """One engine step that feeds decode rows and prompt chunks together (vLLM's and llama.cpp's
    mixed batches). The tokens are flattened to [1, N], so every matmul sees all N at once and the
    weights are read once per step, not once per prompt; only attention runs per part: one batched
    call for the decode rows, one call per chunk against its own row of the cache."""

    def __init__(self, rows: torch.Tensor | None, chunks: list[tuple[int, int, int]]) -> None:
        self.rows, self.chunks = rows, chunks
        self.n_rows = 0 if rows is None else rows.shape[0]
        self.span = int(rows.max()) + 1 if self.n_rows else 0  # the keys the decode rows read
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
            batch, span = torch.arange(r, device=q.device), self.span
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
        return torch.cat(parts, dim=2)


class KVCache:
    """Keys and values of past positions, preallocated for `max_len` positions per layer.

    Plain use: every row holds the same `pos` positions and new ones are appended. Batched decoding
    of rows at different lengths (`at`): each row writes its one new entry at its own position and
    attends to its first rows[b] + 1 entries (the attention mask hides the rest). A mixed step (`mix`):
    decode rows and prompt chunks of other lengths in one forward (see `Mix`).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored
        self.rows: torch.Tensor | None = None  # per-row write positions [B] (batched decoding)
        self.span = 0  # with rows: how many leading entries the attention reads (max(rows) + 1)
        self.mixed: Mix | None = None  # set for one mixed step (see `mix`)

    def view(self, start: int, stop: int) -> KVCache:
        """Rows start:stop, sharing this cache's storage (no copy), with pos 0."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.max_len, view.pos, view.rows, view.span, view.mixed = self.max_len, 0, None, 0, None
        return view

    def mix(self, rows: torch.Tensor | None, chunks: list[tuple[int, int, int]]) -> KVCache:
        """Set up one mixed step over flattened tokens [1, N]: the first len(rows) tokens decode one
        token each in rows 0.. at positions `rows` (as `at`), then each chunk (row, start, length)
        feeds `length` prompt tokens of one row from position `start`. Cleared after the forward."""
        self.mixed = Mix(rows, chunks)
        return self

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


class InferenceLinear(nn.Linear):
    """An `nn.Linear` set up for CPU inference by `Transformer.for_inference`: inside
    `blas_matmuls()` (every step of the inference engine) it multiplies through numpy's BLAS,
    which runs batch-1 products on all threads (models/blas.py); elsewhere it is `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if blas.active() and x.dtype == w.dtype == torch.float32 and not torch.is_grad_enabled() \
                and w.device.type == "cpu":
            return blas.linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        # One fused projection for q, k and v: a single matmul is faster than three.
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * hd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.proj_bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
        self.record: list[torch.Tensor] | None = None  # set by Transformer.inspect: keep explicit weights

    def forward(self, x, rope, mask, cache: KVCache | None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and cache.mixed is not None:
            y = cache.mixed.attend(cache, self.layer, q, k, v, self._attend)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
            y = self._attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v for q [B, nh, T, hd] and k, v [B, n_kv_head, S, hd]."""
        B, nh, S, hd = k.shape[0], q.shape[1], k.shape[2], q.shape[3]
        nkv = k.shape[1]
        if nkv != nh:  # grouped-query attention: each k/v head serves nh // nkv query heads
            rep = nh // nkv
            k = k[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nh, S, hd)
            v = v[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nh, S, hd)
        drop = self.cfg.dropout if self.training else 0.0
        if self.record is not None:  # inspection: the math path, whose weights can be kept
            return self._explicit(q, k, v, mask)
        if isinstance(mask, str):  # "causal": let the kernel build it (fastest path)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)

    def _explicit(self, q, k, v, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, as SDPA computes it, keeping the weights [B, H, T, S]."""
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if isinstance(mask, str):  # "causal" from position 0
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        self.record.append(att)
        return att @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "gated"
        width = cfg.intermediate_size * (2 if self.gated else 1)  # gate and up fused in one matmul
        self.fc = nn.Linear(cfg.n_embd, width, bias=cfg.mlp_bias)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(self.act(gate) * up)
        return self.proj(self.act(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache) -> torch.Tensor:
        if self.post_norm:  # BERT: normalise after adding the residual
            x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """`model(ids)` returns logits [B, T, vocab]; `model.hidden(ids)` the final hidden states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_embedding == "learned":
            self.wpe = nn.Embedding(cfg.context_length, cfg.n_embd)
        if cfg.type_vocab_size:
            self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        if cfg.embedding_norm:
            self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        if cfg.head_transform:
            self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
            self.head_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_embedding == "rope":
            cos, sin = self.rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual-path projections so the residual stream's variance stays put.
        # zero_init (modded-nanogpt, nanochat): start them at zero, so each block begins as the
        # identity, and an untied output layer too, so the first predictions are uniform.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.0 if cfg.zero_init else 0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's rotation angles, [context_length, head_dim]."""
        freqs = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), rope_frequencies(cfg))
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _mask(self, T: int, start: int, attention_mask: torch.Tensor | None, device):
        """The attention mask SDPA gets: "causal", None (attend everywhere) or a boolean tensor."""
        cfg = self.cfg
        window = cfg.sliding_window if cfg.sliding_window and start + T > cfg.sliding_window else None
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding in this batch: keep the fast unmasked kernels
        if attention_mask is None and window is None:
            if not cfg.causal or T == 1:
                return None
            if start == 0:
                return "causal"
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(start + T, device=device)[None, :]
        mask = (k_pos <= q_pos) if cfg.causal else torch.ones(T, start + T, dtype=torch.bool, device=device)
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
        mask = mask[None, None]
        if attention_mask is not None:  # [B, start+T] or [B, T]: 1 = real token, 0 = padding
            keys = attention_mask.bool()[:, None, None, :]
            # A padding query that sees no key would give NaN; let it see itself instead.
            mask = (mask & keys) | (q_pos == k_pos)[None, None]
        return mask

    def hidden(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states [B, T, n_embd] (after the last norm)."""
        cfg = self.cfg
        B, T = idx.shape
        rows = cache.rows if cache is not None else None  # batched decoding: each row at its own position
        mixed = cache.mixed if cache is not None else None
        start = cache.pos if cache is not None else 0
        if mixed is not None:
            pos = mixed.positions(idx.device)  # [N]: each flattened token at its own row's position
        elif rows is not None:
            if T != 1:
                raise LMForgeError(f"batched decoding takes one new token per row (got {T})")
            pos = rows[:, None]  # [B, 1]
        else:
            if start + T > cfg.context_length:
                raise LMForgeError(f"sequence of {start + T} tokens exceeds the context length {cfg.context_length}")
            pos = torch.arange(start, start + T, device=idx.device)  # [T]
        x = self.wte(idx)
        if cfg.pos_embedding == "learned":
            x = x + self.wpe(pos)
        if cfg.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
            x = x + self.wtt(types)
        if cfg.embedding_norm:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if cfg.pos_embedding == "rope":
            if mixed is not None:  # [N, hd]: one rotation per token
                rope = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))
            elif rows is not None:  # [B, 1, 1, hd]: one rotation per row, shared by its heads
                rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))
            else:
                rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        mask = None
        if mixed is not None:  # each part's own mask, built once for every layer
            mixed.masks = [self._row_mask(mixed.rows, mixed.span)] if mixed.n_rows else []
            mixed.masks += [self._mask(n, s, None, idx.device) for _, s, n in mixed.chunks]
        elif rows is not None:
            mask = self._row_mask(rows, cache.span)
        else:
            mask = self._mask(T, start, attention_mask, idx.device)
        try:
            for block in self.blocks:
                x = block(x, rope, mask, cache)
        finally:
            if mixed is not None:
                cache.mixed = None
        if cache is not None and rows is None and mixed is None:
            cache.pos += T
        return self.norm(x)

    @torch.no_grad()
    def inspect(self, idx: torch.Tensor, *, token_type_ids: torch.Tensor | None = None,
                layers: list[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What happens inside, for `lmforge inspect`: the attention weights [B, H, T, T] of `layers`
        (default all; in order), computed on the math path only for those (every other layer and
        call keeps SDPA's fused kernels), and the residual stream [B, T, C] after the embeddings and
        after each block (n_layer + 1 entries; the final norm is not applied, so `head(norm(x))` of
        an entry is the logit lens at that depth)."""
        layers = list(range(len(self.blocks))) if layers is None else sorted(layers)
        attention: list[torch.Tensor] = []
        stream: list[torch.Tensor] = []
        hooks = [self.blocks[0].register_forward_pre_hook(lambda _m, args: stream.append(args[0]))]
        hooks += [b.register_forward_hook(lambda _m, _a, out: stream.append(out)) for b in self.blocks]
        for i in layers:
            self.blocks[i].attn.record = attention
        try:
            self.hidden(idx, token_type_ids=token_type_ids)
        finally:
            for block in self.blocks:
                block.attn.record = None
            for h in hooks:
                h.remove()
        return attention, stream

    def _row_mask(self, rows: torch.Tensor, span: int) -> torch.Tensor:
        """[B, 1, 1, span]: row b's query (at position rows[b]) sees keys 0..rows[b] (and, with a
        sliding window, only the last `window` of them); later entries belong to nothing yet."""
        k_pos = torch.arange(span, device=rows.device)[None, :]
        mask = k_pos <= rows[:, None]
        if self.cfg.sliding_window:
            mask = mask & (k_pos > rows[:, None] - self.cfg.sliding_window)
        return mask[:, None, None, :]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> vocabulary logits."""
        logits = self.lm_head(self._head_input(h))
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, reduction: str = "mean") -> torch.Tensor:
        """Logits [B, T, vocab]; or, given `targets` [B, T] (-100 = ignore), the cross-entropy:
        its mean, its sum, or (reduction="none") per-token losses [B, T] in fp32, 0 where ignored.

        The loss path never materialises the full logits (see `linear_cross_entropy`).
        """
        h = self.hidden(idx, attention_mask=attention_mask, token_type_ids=token_type_ids, cache=cache)
        if targets is None:
            return self.head(h[:, -1:] if last_only else h)
        weight, bias = self.head_weight_and_bias()
        loss = linear_cross_entropy(self._head_input(h).flatten(0, 1), weight, bias, targets.flatten(),
                                    reduction=reduction, softcap=self.cfg.logit_softcap)
        return loss.view(targets.shape) if reduction == "none" else loss

    def _head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the output layer multiplies: h, after BERT's head transform where there is one."""
        if self.cfg.head_transform:
            h = self.head_norm(ACTIVATIONS[self.cfg.activation](self.head_dense(h)))
        return h

    def score_targets(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token losses (fp32) and top predictions [N] at the N positions where `targets` [B, T]
        is not -100: only those reach the output layer, through the loss path's chunks, so scoring
        masked tokens never holds [B, T, vocab] logits (nor even [N, vocab]). One call (under FSDP
        registered as a forward pass: see training.sharded)."""
        sel = targets != -100
        weight, bias = self.head_weight_and_bias()
        return token_losses_and_predictions(self._head_input(self.hidden(idx)[sel]), weight, bias, targets[sel],
                                            softcap=self.cfg.logit_softcap)

    def head_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output layer's effective weight and bias, for the fused loss (which needs the matrix,
        not the module). A head that adapts its weight (a LoRA layer's `effective_weight()`: W +
        scale * B A, differentiable in A and B) is asked for it, so adapting lm_head trains through
        the loss path too. LoRA dropout, applied to the head's input, has no weight form there."""
        head = self.lm_head
        weight = head.effective_weight() if hasattr(head, "effective_weight") else head.weight
        return weight, head.bias

    def finish_loading(self) -> None:
        """After weights were assigned onto a meta-device skeleton: re-tie the output matrix to the
        embedding and rebuild the (unsaved) rotary tables on the weights' device."""
        if self.cfg.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.wte.weight
        if self.cfg.pos_embedding == "rope":
            with torch.device(next(self.parameters()).device):  # not wte's: a quantised table has no .weight
                self.rope_cos, self.rope_sin = self.rope_tables(self.cfg)

    def for_inference(self) -> Transformer:
        """Make each plain linear layer on the CPU an `InferenceLinear` (the same module and
        parameters, so the results and saved files are unchanged): inside the inference engine's
        steps it multiplies through numpy's BLAS. `load_model` applies it."""
        for m in self.modules():
            if type(m) is nn.Linear and m.weight.device.type == "cpu":  # not subclasses (LoRA)
                m.__class__ = InferenceLinear
        return self

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())  # the activations' dtype (not wte's: an int8 table has no .weight)
        return KVCache(self.cfg, batch, max_len or self.cfg.context_length, p.device, p.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if hasattr(self, "wpe"):
                n -= self.wpe.weight.numel()
        return n


class Classifier(nn.Module):
    """A transformer body with a classification head on one pooled hidden state per sequence.

    Pooling: "last" (the last real token: a decoder has read the whole text there), "cls" (the
    first token, BERT-style) or "mean" (average over real tokens).
    """

    def __init__(self, cfg: ModelConfig, n_classes: int, pooling: str = "last",
                 backbone: Transformer | None = None) -> None:
        super().__init__()
        if pooling not in ("last", "cls", "mean"):
            raise LMForgeError(f"unknown pooling {pooling!r} (choose last, cls or mean)")
        self.backbone = backbone if backbone is not None else Transformer(cfg)
        self.backbone.lm_head = nn.Identity()  # the vocabulary projection is not needed here
        if cfg.head_transform:  # nor a masked-LM head's transform
            del self.backbone.head_dense, self.backbone.head_norm
        p = next(self.backbone.parameters())
        self.head = nn.Linear(cfg.n_embd, n_classes, device=p.device, dtype=p.dtype)
        self.pooling = pooling
        if p.device.type != "meta":
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def cfg(self) -> ModelConfig:
        return self.backbone.cfg

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, n_classes] for right-padded `idx` [B, T] (mask: 1 = real token)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        # A causal body never lets real tokens see the right padding, so it needs no mask (and
        # keeps the fast attention path); a bidirectional one does.
        h = self.backbone.hidden(idx, attention_mask=None if self.cfg.causal else attention_mask)
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(1) - 1]
        elif self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled)

    def finish_loading(self) -> None:
        self.backbone.finish_loading()
