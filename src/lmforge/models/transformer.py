"""One transformer for every architecture lmforge supports, driven by `ModelConfig`.

GPT-2 (learned positions, LayerNorm, GELU, biases, tied embeddings), Llama/Mistral/Qwen
(RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, q/k norms), BERT-style encoders
(bidirectional, post-LayerNorm, token types) and the encoder-decoders T5 and BART (a `Decoder`
stack whose blocks add cross-attention; T5's relative position buckets) are all settings of the
same few modules.
This file knows nothing about files, the CLI or training.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError
from . import blas
from .cache import KVCache
from .config import ACTIVATIONS, ModelConfig
from .loss import linear_cross_entropy, token_losses_and_predictions
from .relpos import relative_bias


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


def attend(q, k, v, mask, scale: float | None, dropout: float, record: list | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over heads [B, H, T, hd]: SDPA's fused kernels, or with
    `record` (inspection) the math path, whose weights are appended to it. `mask`: None,
    "causal", a boolean tensor (True = attend) or a float bias (T5's relative positions)."""
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    if nkv != nh:  # grouped-query attention: each k/v head serves nh // nkv query heads
        rep = nh // nkv
        k = k[:, :, None].expand(B, nkv, rep, k.shape[2], hd).reshape(B, nh, k.shape[2], hd)
        v = v[:, :, None].expand(B, nkv, rep, v.shape[2], hd).reshape(B, nh, v.shape[2], hd)
    if record is not None:
        return _explicit(q, k, v, mask, scale, record)
    if isinstance(mask, str):  # "causal": let the kernel build it (fastest path)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def _explicit(q, k, v, mask, scale: float | None, record: list) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, as SDPA computes it, keeping the weights [B, H, T, S]."""
    att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if isinstance(mask, str):  # "causal" from position 0
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    att = att.softmax(dim=-1)
    record.append(att)
    return att @ v


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
        return attend(q, k, v, mask, self.cfg.attn_scale, self.cfg.dropout if self.training else 0.0, self.record)


class CrossAttention(nn.Module):
    """A decoder block's attention to the encoder's output (the memory). Its keys and values depend
    only on the memory, so generation computes them once per request (`Transformer.remember`) and
    reads them from the cache at every step."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * hd, bias=cfg.qkv_bias)  # k and v fused
        self.proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.proj_bias)
        self.record: list[torch.Tensor] | None = None

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory [B, S, C] as keys and values [B, n_kv_head, S, head_dim]."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.cfg.n_kv_head, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, memory, mask, cache: KVCache | None) -> torch.Tensor:
        """`memory` [B, S, C] and its `mask` (boolean [B, 1, 1, S] or None); memory None: read the
        cache's stored keys and values."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        if memory is None:
            span = cache.cross_span
            k, v = cache.cross_k[self.layer][:, :, :span], cache.cross_v[self.layer][:, :, :span]
            mask = cache.cross_mask[:, None, None, :span]
        else:
            k, v = self.keys_values(memory)
        y = attend(q, k, v, mask, cfg.attn_scale, cfg.dropout if self.training else 0.0, self.record)
        return self.proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


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
    def __init__(self, cfg: ModelConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        if cross:  # an encoder-decoder's decoder block: self-attention, cross-attention, MLP
            self.norm_cross, self.cross_attn = make_norm(cfg), CrossAttention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, cross: tuple | None = None) -> torch.Tensor:
        """`cross`: (memory or None, memory mask) for a decoder block (see `CrossAttention`)."""
        if self.post_norm:  # BERT: normalise after adding the residual
            x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache)))
            if cross is not None:
                x = self.norm_cross(x + self.drop(self.cross_attn(x, *cross, cache)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        if cross is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), *cross, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class Decoder(nn.Module):
    """An encoder-decoder's decoder stack: its own positions, blocks with cross-attention and
    final norm (the token embedding and output layer are the model's, shared with the encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.pos_embedding == "learned":
            self.wpe = nn.Embedding(cfg.context_length + cfg.pos_offset, cfg.n_embd)
        if cfg.pos_embedding == "relative":  # T5: one bias per bucket and head, shared by all layers
            self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        if cfg.embedding_norm:
            self.emb_norm = make_norm(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, cross=True) for i in range(cfg.n_decoder_layer))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()


@contextmanager
def _watching(blocks: nn.ModuleList, layers, attention: list, stream: list | None = None, part: str = "attn"):
    """While inside: the attention weights of `blocks[layers]` (their `part`: attn or cross_attn) go
    to `attention`, and with `stream` the residual stream before the first block and after each."""
    hooks = []
    if stream is not None:
        hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: stream.append(args[0]))]
        hooks += [b.register_forward_hook(lambda _m, _a, out: stream.append(out)) for b in blocks]
    for i in layers:
        getattr(blocks[i], part).record = attention
    try:
        yield
    finally:
        for block in blocks:
            getattr(block, part).record = None
        for h in hooks:
            h.remove()


class Transformer(nn.Module):
    """`model(ids)` returns logits [B, T, vocab]; `model.hidden(ids)` the final hidden states.

    An encoder-decoder (`cfg.n_decoder_layer` > 0): `encode(src)` gives the memory, `decode(ids,
    memory)` the decoder's hidden states, `head(h)` their logits; `model(src, labels,
    decoder_input_ids=...)` is `seq2seq` (teacher-forced logits or loss).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_embedding == "learned":
            self.wpe = nn.Embedding(cfg.context_length + cfg.pos_offset, cfg.n_embd)
        if cfg.pos_embedding == "relative":  # the encoder's (an encoder-decoder's `Decoder` has its own)
            self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        if cfg.type_vocab_size:
            self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        if cfg.embedding_norm:
            self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        if cfg.is_encoder_decoder:  # the blocks above are the encoder
            self.decoder = Decoder(cfg)
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

    # --- encoder-decoder (T5, BART) --------------------------------------------------------------
    def _embed(self, idx: torch.Tensor, pos: torch.Tensor, stack: nn.Module) -> torch.Tensor:
        """An encoder-decoder stack's input: token embeddings (times embed_scale) plus `stack`'s
        learned positions at `pos` (shifted by pos_offset), then its embedding norm and dropout."""
        cfg = self.cfg
        x = self.wte(idx)
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        if cfg.pos_embedding == "learned":
            x = x + stack.wpe(pos + cfg.pos_offset)
        if cfg.embedding_norm:
            x = stack.emb_norm(x)
        return self.drop(x)

    def _stack_mask(self, stack: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
                    key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """SDPA's mask for queries at `q_pos` [B|1, T] and keys at `k_pos` [S]: boolean (causal
        and/or the keys' padding, `key_mask` [B, S]), or with relative positions `stack`'s bias
        [B|1, H, T, S] with -inf where masked; None where nothing is."""
        mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None] if causal else None
        if key_mask is not None:
            keys = key_mask.bool()[:, None, None, :]
            mask = keys if mask is None else mask & keys
        if self.cfg.pos_embedding != "relative":
            return mask
        bias = relative_bias(stack.rel_bias, q_pos, k_pos, not causal, self.cfg.rel_max_distance)
        return bias if mask is None else torch.where(mask, bias, float("-inf"))

    def _require_encoder_decoder(self) -> ModelConfig:
        if not self.cfg.is_encoder_decoder:
            raise LMForgeError("this model is not an encoder-decoder (n_decoder_layer is 0)")
        return self.cfg

    def _check_length(self, n: int, what: str) -> None:
        if n > self.cfg.context_length:
            raise LMForgeError(f"{what} of {n} tokens exceeds the context length {self.cfg.context_length}")

    def encode(self, src_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An encoder-decoder's encoder output (the memory) [B, S, n_embd] for source ids [B, S];
        `attention_mask` [B, S]: 1 = real token, 0 = padding."""
        self._require_encoder_decoder()
        self._check_length(src_ids.shape[1], "a source")
        pos = torch.arange(src_ids.shape[1], device=src_ids.device)
        x = self._embed(src_ids, pos, self)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: keep the unmasked kernels
        mask = self._stack_mask(self, pos[None], pos, False, attention_mask)
        for block in self.blocks:
            x = block(x, None, mask, None)
        return self.norm(x)

    def decode(self, idx: torch.Tensor, encoder_out: torch.Tensor | None = None,
               encoder_mask: torch.Tensor | None = None, *, cache: KVCache | None = None) -> torch.Tensor:
        """Decoder hidden states [B, T, n_embd] (after its final norm; `head` gives logits) for
        decoder input ids [B, T], attending to `encoder_out` [B, S, C] (`encoder_mask` [B, S]:
        1 = real source token).

        With a `cache` (`new_cache`), a given `encoder_out` is first stored in it (`remember`: pass
        it with the first call only) and each call reads the stored cross-attention keys and values;
        positions continue from `cache.pos`, or per row after `cache.at(rows, span)` (batched
        decoding, one token per row)."""
        cfg = self._require_encoder_decoder()
        dec = self.decoder
        T = idx.shape[1]
        rows = cache.rows if cache is not None else None
        start = cache.pos if cache is not None else 0
        if rows is not None:
            if T != 1:
                raise LMForgeError(f"batched decoding takes one new token per row (got {T})")
            q_pos, span = rows[:, None], cache.span
        else:
            self._check_length(start + T, "a decoder sequence")
            q_pos, span = torch.arange(start, start + T, device=idx.device)[None], start + T
        x = self._embed(idx, q_pos, dec)
        if cfg.pos_embedding != "relative" and rows is None and (start == 0 or T == 1):
            mask = "causal" if T > 1 else None  # the fast kernels
        else:
            mask = self._stack_mask(dec, q_pos, torch.arange(span, device=idx.device), True, None)
        if encoder_out is not None and cache is not None and cache.cross_k is not None:
            self.remember(cache, encoder_out, encoder_mask)
            encoder_out = None
        if encoder_out is not None:
            keep = encoder_mask is not None and not bool(encoder_mask.all())
            cross = (encoder_out, encoder_mask.bool()[:, None, None, :] if keep else None)
        elif cache is None or not cache.cross_span:
            raise LMForgeError("decode needs encoder_out, or a cache that holds it (Transformer.remember)")
        else:
            cross = (None, None)  # read from the cache
        for block in dec.blocks:
            x = block(x, None, mask, cache, cross)
        if cache is not None and rows is None:
            cache.pos += T
        return dec.norm(x)

    def remember(self, cache: KVCache, encoder_out: torch.Tensor, encoder_mask: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> None:
        """Store each decoder layer's cross-attention keys and values of `encoder_out` [b, S, C] in
        cache rows `rows` (default 0..b-1): computed once per request, read at every decoding step."""
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_out.shape[:2], dtype=torch.bool, device=encoder_out.device)
        cache.store_cross([b.cross_attn.keys_values(encoder_out) for b in self.decoder.blocks], encoder_mask, rows)

    def start_ids(self, batch: int, device) -> torch.Tensor:
        """[batch, 1] decoder start tokens: the first decoder input of generation."""
        start = self.cfg.decoder_start_token_id
        if start is None:
            raise LMForgeError("this encoder-decoder has no decoder_start_token_id")
        return torch.full((batch, 1), start, dtype=torch.long, device=device)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: the start token, then `labels` [B, T] but their last
        (-100 becomes the start token: ignored positions need some valid id)."""
        ids = torch.cat([self.start_ids(labels.shape[0], labels.device), labels[:, :-1]], dim=1)
        return ids.masked_fill(ids == -100, self.cfg.decoder_start_token_id)

    def seq2seq(self, src_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, src_mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """An encoder-decoder's teacher-forced pass: logits [B, T, vocab] for `decoder_input_ids`
        [B, T]; or, given `labels` [B, T] (-100 = ignore), the cross-entropy (mean, sum or per
        token, as `forward`), through the fused loss path. Without decoder_input_ids they are the
        labels shifted right (`shift_right`). `src_mask` [B, S]: 1 = real source token."""
        if decoder_input_ids is None:
            if labels is None:
                raise LMForgeError("seq2seq needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        h = self.decode(decoder_input_ids, self.encode(src_ids, src_mask), src_mask)
        return self._logits_or_loss(h, labels, reduction=reduction)

    @torch.no_grad()
    def inspect(self, idx: torch.Tensor, *, token_type_ids: torch.Tensor | None = None,
                layers: list[int] | None = None, decoder_input_ids: torch.Tensor | None = None) -> tuple:
        """What happens inside, for `lmforge inspect`: the attention weights [B, H, T, T] of `layers`
        (default all; in order), computed on the math path only for those (every other layer and
        call keeps SDPA's fused kernels), and the residual stream [B, T, C] after the embeddings and
        after each block (n_layer + 1 entries; the final norm is not applied, so `head(norm(x))` of
        an entry is the logit lens at that depth).

        An encoder-decoder reads `idx` as the source and `decoder_input_ids` (default: the start
        token) as the decoder's input, and returns dicts instead: attention {"encoder", "decoder",
        "cross"} (cross: [B, H, T_dec, S]) and stream {"encoder", "decoder"}."""
        if self.cfg.is_encoder_decoder:
            return self._inspect_seq2seq(idx, decoder_input_ids, layers)
        layers = list(range(len(self.blocks))) if layers is None else sorted(layers)
        attention: list[torch.Tensor] = []
        stream: list[torch.Tensor] = []
        with _watching(self.blocks, layers, attention, stream):
            self.hidden(idx, token_type_ids=token_type_ids)
        return attention, stream

    def _inspect_seq2seq(self, src: torch.Tensor, dec_ids: torch.Tensor | None, layers: list[int] | None):
        """`inspect` for an encoder-decoder: ({"encoder", "decoder", "cross"}: weights [B, H, T, S] of
        `layers` (default all) of each stack, {"encoder", "decoder"}: residual streams)."""
        if dec_ids is None:
            dec_ids = self.start_ids(src.shape[0], src.device)
        att: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        stream: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": []}
        blocks = self.decoder.blocks
        enc = range(len(self.blocks)) if layers is None else sorted(layers)
        dec = range(len(blocks)) if layers is None else sorted(layers)
        with _watching(self.blocks, enc, att["encoder"], stream["encoder"]):
            memory = self.encode(src)
        with _watching(blocks, dec, att["decoder"], stream["decoder"]), _watching(blocks, dec, att["cross"],
                                                                                   part="cross_attn"):
            self.decode(dec_ids, memory)
        return att, stream

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
                cache: KVCache | None = None, last_only: bool = False, reduction: str = "mean",
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]; or, given `targets` [B, T] (-100 = ignore), the cross-entropy:
        its mean, its sum, or (reduction="none") per-token losses [B, T] in fp32, 0 where ignored.

        The loss path never materialises the full logits (see `linear_cross_entropy`). An
        encoder-decoder reads `idx` as the source (`attention_mask` its padding) and goes to `seq2seq`.
        """
        if self.cfg.n_decoder_layer:
            return self.seq2seq(idx, decoder_input_ids, targets, src_mask=attention_mask, reduction=reduction)
        h = self.hidden(idx, attention_mask=attention_mask, token_type_ids=token_type_ids, cache=cache)
        return self._logits_or_loss(h, targets, last_only, reduction)

    def _logits_or_loss(self, h: torch.Tensor, targets: torch.Tensor | None, last_only: bool = False,
                        reduction: str = "mean") -> torch.Tensor:
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
        if self.cfg.head_scale != 1.0:  # T5's tied output layer
            h = h * self.cfg.head_scale
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

    def for_inference(self, transpose: bool = False) -> Transformer:
        """Make each plain linear layer on the CPU an `InferenceLinear` (the same module and
        parameters, so the results and saved files are unchanged): inside the inference engine's
        steps it multiplies through numpy's BLAS. `load_model` applies it.

        `transpose`: also store each of their weights input-major ([in, out] in memory, seen
        through a transposed view, so shapes and values are unchanged). OpenBLAS reads that layout
        faster for the many-row products of batched decoding (a step of GPT-2 124M shapes on the
        2-core VM: 16 streams 143 -> 105 ms, 4 streams 96 -> 76 ms; but one stream alone 27 -> 31
        ms). Only for a model that is served, not trained or saved: the views are not contiguous."""
        for m in self.modules():
            if type(m) is nn.Linear and m.weight.device.type == "cpu":  # not subclasses (LoRA)
                m.__class__ = InferenceLinear
        if transpose:
            for w in {id(m.weight): m.weight for m in self.modules() if type(m) is InferenceLinear}.values():
                if w.dtype == torch.float32 and w.is_contiguous():  # a tied weight once
                    w.data = w.data.t().contiguous().t()
        return self

    def new_cache(self, batch: int = 1, max_len: int | None = None, max_src_len: int | None = None) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` positions (default: the context); an
        encoder-decoder's also holds cross-attention keys and values of up to `max_src_len` source
        tokens per row (default: the context)."""
        p = next(self.parameters())  # the activations' dtype (not wte's: an int8 table has no .weight)
        src = (max_src_len or self.cfg.context_length) if self.cfg.is_encoder_decoder else 0
        return KVCache(self.cfg, batch, max_len or self.cfg.context_length, p.device, p.dtype, src)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            for stack in (self, getattr(self, "decoder", None)):
                if hasattr(stack, "wpe"):
                    n -= stack.wpe.weight.numel()
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
