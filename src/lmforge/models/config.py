"""`ModelConfig`: every architecture lmforge supports is a setting of these fields.

GPT-2, Llama/Mistral/Qwen, BERT and the encoder-decoders T5 and BART differ only in field values
(norm, mlp, pos_embedding, n_decoder_layer, ...), never in classes. Saved as the "model" entry
of a model directory's config.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch.nn.functional as F

from ..core.errors import LMForgeError

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (So et al. 2021, Primer; modded-nanogpt, nanochat)
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    context_length: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # None: n_head (multi-head); fewer: grouped-query attention
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3 sets it independently)
    intermediate_size: int | None = None  # MLP width; None: 4*n_embd, or ~8/3*n_embd when gated
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "plain"  # "plain": proj(act(fc(x)))  |  "gated": proj(act(gate(x)) * up(x)) (SwiGLU)
    activation: str = "gelu_tanh"  # see ACTIVATIONS
    pos_embedding: str = "learned"  # "learned" | "rope" | "none" | "relative" (T5's bucketed attention bias)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3", "factor": ..., ...}
    bias: bool = True  # biases in linear layers (and LayerNorm)
    qkv_bias: bool | None = None  # None: same as `bias` (Qwen2 has q/k/v biases only)
    proj_bias: bool | None = None  # attention output projection; None: same as `bias`
    mlp_bias: bool | None = None  # None: same as `bias`
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    tie_embeddings: bool = True
    zero_init: bool = False  # start each block's output projections (and an untied output layer) at zero
    logit_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2, nanochat)
    causal: bool = True  # False: bidirectional encoder
    sliding_window: int | None = None  # attend only to the last N positions (Mistral)
    dropout: float = 0.0
    # Encoder (BERT) layout
    norm_position: str = "pre"  # "pre" (GPT/Llama) | "post" (BERT: norm after each residual add)
    type_vocab_size: int = 0  # >0: token-type (segment) embeddings
    embedding_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    head_transform: bool = False  # dense + activation + norm before the output layer (BERT MLM head)
    lm_head_bias: bool = False
    # Encoder-decoder (T5, BART) layout: n_layer encoder blocks, then n_decoder_layer decoder blocks
    # that also attend to the encoder's output (cross-attention). 0: not an encoder-decoder.
    n_decoder_layer: int = 0
    rel_buckets: int = 32  # pos_embedding="relative": buckets per direction set (T5)
    rel_max_distance: int = 128  # ... and the distance from which all share the last bucket
    attn_scale: float | None = None  # attention scores times this; None: 1/sqrt(head_dim) (T5: 1.0)
    pos_offset: int = 0  # learned positions start at this row of the table (BART: 2)
    embed_scale: float = 1.0  # token embeddings times this (BART's scale_embedding: sqrt(n_embd))
    head_scale: float = 1.0  # hidden states times this before the output layer (T5's tied head: n_embd**-0.5)
    decoder_start_token_id: int | None = None  # the decoder's first input token (T5: pad, BART: eos)
    extra: dict = field(default_factory=dict)  # free-form notes carried along (e.g. the source family)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LMForgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "gated":  # ~8/3 * width keeps parameters equal to a 4x plain MLP
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        for name in ("qkv_bias", "proj_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, self.bias)
        checks = [
            (self.n_head % self.n_kv_head == 0, f"n_head ({self.n_head}) must be a multiple of n_kv_head "
             f"({self.n_kv_head})"),
            (self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r}"),
            (self.mlp in ("plain", "gated"), f"unknown mlp {self.mlp!r}"),
            (self.activation in ACTIVATIONS, f"unknown activation {self.activation!r}"),
            (self.pos_embedding in ("learned", "rope", "none", "relative"),
             f"unknown pos_embedding {self.pos_embedding!r}"),
            (self.n_decoder_layer >= 0, "n_decoder_layer must be >= 0"),
            (self.is_encoder_decoder or (self.pos_embedding != "relative" and not self.pos_offset
                                         and self.embed_scale == 1.0),
             "relative positions, pos_offset and embed_scale are for encoder-decoders (n_decoder_layer > 0)"),
            (self.rel_buckets >= 4 and self.rel_max_distance > self.rel_buckets // 2,
             "rel_buckets must be at least 4 (each direction keeps exact and logarithmic buckets) and "
             "rel_max_distance must exceed rel_buckets / 2"),
            (self.norm_position in ("pre", "post"), f"unknown norm_position {self.norm_position!r}"),
            (self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap must be positive"),
            (min(self.vocab_size, self.context_length, self.n_layer, self.n_embd) > 0,
             "vocab_size, context_length, n_layer and n_embd must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LMForgeError(f"invalid model config: {msg}")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_decoder_layer > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LMForgeError(f"unknown model config keys {unknown}; is this model from a newer lmforge?")
        return cls(**d)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight plus attention's score/mix work."""
    hd = cfg.head_dim
    attn = cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * cfg.n_embd
    mlp = cfg.n_embd * cfg.intermediate_size * (3 if cfg.mlp == "gated" else 2)
    weights = cfg.n_layer * (attn + mlp) + cfg.n_embd * cfg.vocab_size  # the output layer counts
    weights += cfg.n_decoder_layer * (2 * attn + mlp)  # a decoder block adds cross-attention
    return 6 * weights + 12 * cfg.n_layer * cfg.n_head * hd * cfg.context_length
