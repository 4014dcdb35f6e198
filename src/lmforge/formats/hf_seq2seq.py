"""Hugging Face's encoder-decoders <-> lmforge: T5 (v1.0, v1.1 / FLAN-T5) and BART.

The same shape as `hf.py` (a config mapping and a weight plan per family), for the two families
whose decoder blocks attend to the encoder: lmforge keeps the encoder at the top level (`blocks`,
`norm`, `wpe`, `rel_bias`) and the decoder under `decoder.`, with cross-attention's k and v fused.
"""

from __future__ import annotations

import math

from ..core.errors import LMForgeError
from ..models.config import ModelConfig

SEQ2SEQ = ("t5", "bart")
ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}


def t5_scales_output(c: dict) -> bool:
    """Whether T5 multiplies the decoder output by d_model^-0.5 before its output layer: v1.0 does
    (tied head), v1.1 / FLAN-T5 do not (transformers 5 writes scale_decoder_outputs; older
    versions read it from tie_word_embeddings)."""
    if "scale_decoder_outputs" in c:
        return bool(c["scale_decoder_outputs"])
    return c.get("tie_word_embeddings", True) is not False


def config_from_hf(c: dict, activation) -> ModelConfig:
    """lmforge's ModelConfig for a T5 or BART `config.json` (`activation` maps HF names)."""
    family = c["model_type"]
    extra = {"hf_family": family}
    if family == "t5":
        proj = c.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        d = c.get("d_model", 512)
        return ModelConfig(
            vocab_size=c.get("vocab_size", 32128), context_length=c.get("n_positions") or 512,
            n_layer=c.get("num_layers", 6), n_decoder_layer=c.get("num_decoder_layers") or c.get("num_layers", 6),
            n_head=c.get("num_heads", 8), n_embd=d, head_dim=c.get("d_kv", 64), intermediate_size=c.get("d_ff", 2048),
            norm="rmsnorm", norm_eps=c.get("layer_norm_epsilon", 1e-6), mlp="gated" if gated else "plain",
            activation=activation(act), pos_embedding="relative",
            rel_buckets=c.get("relative_attention_num_buckets", 32),
            rel_max_distance=c.get("relative_attention_max_distance", 128), bias=False, attn_scale=1.0,
            tie_embeddings=True, head_scale=d ** -0.5 if t5_scales_output(c) else 1.0,
            decoder_start_token_id=c.get("decoder_start_token_id", c.get("pad_token_id", 0)), extra=extra)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if c.get(a, 16) != c.get(b, 16):
            raise LMForgeError(f"BART with {a} != {b} is not supported")
    if c.get("normalize_before") or c.get("add_final_layer_norm"):
        raise LMForgeError("BART variants with pre-LayerNorm (mBART-style normalize_before) are not supported")
    d = c.get("d_model", 1024)
    return ModelConfig(
        vocab_size=c.get("vocab_size", 50265), context_length=c.get("max_position_embeddings", 1024),
        n_layer=c.get("encoder_layers", 12), n_decoder_layer=c.get("decoder_layers", 12),
        n_head=c.get("encoder_attention_heads", 16), n_embd=d, intermediate_size=c.get("encoder_ffn_dim", 4096),
        norm="layernorm", norm_eps=1e-5, mlp="plain", activation=activation(c.get("activation_function", "gelu")),
        pos_embedding="learned", pos_offset=2, bias=True, norm_position="post", embedding_norm=True,
        embed_scale=math.sqrt(d) if c.get("scale_embedding") else 1.0, lm_head_bias=True, tie_embeddings=True,
        decoder_start_token_id=c.get("decoder_start_token_id", 2), extra=extra)


def export_family(cfg: ModelConfig) -> str:
    """t5 or bart: the family that expresses this encoder-decoder exactly."""
    fam = cfg.extra.get("hf_family")
    if fam in SEQ2SEQ:
        return fam
    if cfg.pos_embedding == "relative" and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and not cfg.bias:
        return "t5"
    if cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.norm_position == "post" and cfg.bias:
        return "bart"
    raise LMForgeError("this encoder-decoder has no Hugging Face equivalent lmforge can export (T5 or BART)")


def config_to_hf(cfg: ModelConfig, family: str, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 act_to_hf: dict) -> dict:
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "is_encoder_decoder": True, "eos_token_id": eos_id, "pad_token_id": pad_id,
              "decoder_start_token_id": cfg.decoder_start_token_id, "torch_dtype": "float32"}
    if family == "t5":
        act = act_to_hf[cfg.activation]
        proj = ("gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}") if cfg.mlp == "gated" else act
        scaled = t5_head_scaled(cfg)
        return {**common, "d_model": cfg.n_embd, "d_kv": cfg.head_dim, "d_ff": cfg.intermediate_size,
                "num_layers": cfg.n_layer, "num_decoder_layers": cfg.n_decoder_layer, "num_heads": cfg.n_head,
                "relative_attention_num_buckets": cfg.rel_buckets,
                "relative_attention_max_distance": cfg.rel_max_distance, "layer_norm_epsilon": cfg.norm_eps,
                "feed_forward_proj": proj, "dropout_rate": 0.0, "n_positions": cfg.context_length,
                # transformers < 5 reads the output scale from tie_word_embeddings; 5 from scale_decoder_outputs
                "tie_word_embeddings": scaled, "scale_decoder_outputs": scaled}
    return {**common, "bos_token_id": bos_id, "d_model": cfg.n_embd, "encoder_layers": cfg.n_layer,
            "decoder_layers": cfg.n_decoder_layer, "encoder_attention_heads": cfg.n_head,
            "decoder_attention_heads": cfg.n_head, "encoder_ffn_dim": cfg.intermediate_size,
            "decoder_ffn_dim": cfg.intermediate_size, "max_position_embeddings": cfg.context_length,
            "activation_function": act_to_hf[cfg.activation], "scale_embedding": cfg.embed_scale != 1.0,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "forced_eos_token_id": None,
            "tie_word_embeddings": cfg.tie_embeddings}


def t5_head_scaled(cfg: ModelConfig) -> bool:
    if cfg.head_scale not in (1.0, cfg.n_embd ** -0.5):
        raise LMForgeError(f"T5 scales its output by d_model^-0.5 or not at all (this model: {cfg.head_scale})")
    return cfg.head_scale != 1.0


def plan(cfg: ModelConfig, family: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(lmforge name, Hugging Face names, how) for every tensor (how: copy, cat, or row: BART's
    final_logits_bias is [1, vocab])."""
    return _t5_plan(cfg) if family == "t5" else _bart_plan(cfg)


def _t5_plan(cfg: ModelConfig) -> list:
    out = [("wte.weight", ("shared.weight",), "copy"), ("lm_head.weight", ("lm_head.weight",), "copy")]
    gated = cfg.mlp == "gated"
    for stack, theirs, n in (("", "encoder.", cfg.n_layer), ("decoder.", "decoder.", cfg.n_decoder_layer)):
        out += [(f"{stack}rel_bias.weight", (f"{theirs}block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                 "copy"), (f"{stack}norm.weight", (f"{theirs}final_layer_norm.weight",), "copy")]
        for i in range(n):
            b, h = f"{stack}blocks.{i}.", f"{theirs}block.{i}.layer."
            a = f"{h}0.SelfAttention."
            out += [(f"{b}attn.qkv.weight", (f"{a}q.weight", f"{a}k.weight", f"{a}v.weight"), "cat"),
                    (f"{b}attn.proj.weight", (f"{a}o.weight",), "copy"),
                    (f"{b}norm1.weight", (f"{h}0.layer_norm.weight",), "copy")]
            ff = 1
            if stack:
                c = f"{h}1.EncDecAttention."
                out += [(f"{b}cross_attn.q.weight", (f"{c}q.weight",), "copy"),
                        (f"{b}cross_attn.kv.weight", (f"{c}k.weight", f"{c}v.weight"), "cat"),
                        (f"{b}cross_attn.proj.weight", (f"{c}o.weight",), "copy"),
                        (f"{b}norm_cross.weight", (f"{h}1.layer_norm.weight",), "copy")]
                ff = 2
            d = f"{h}{ff}.DenseReluDense."
            fc = (f"{d}wi_0.weight", f"{d}wi_1.weight") if gated else (f"{d}wi.weight",)
            out += [(f"{b}mlp.fc.weight", fc, "cat" if gated else "copy"),
                    (f"{b}mlp.proj.weight", (f"{d}wo.weight",), "copy"),
                    (f"{b}norm2.weight", (f"{h}{ff}.layer_norm.weight",), "copy")]
    return out


def _bart_plan(cfg: ModelConfig) -> list:
    out = [("wte.weight", ("model.shared.weight",), "copy"), ("lm_head.weight", ("lm_head.weight",), "copy"),
           ("lm_head.bias", ("final_logits_bias",), "row")]
    for stack, theirs, n in (("", "model.encoder.", cfg.n_layer), ("decoder.", "model.decoder.", cfg.n_decoder_layer)):
        out.append((f"{stack}wpe.weight", (f"{theirs}embed_positions.weight",), "copy"))
        for kind in ("weight", "bias"):
            out.append((f"{stack}emb_norm.{kind}", (f"{theirs}layernorm_embedding.{kind}",), "copy"))
            for i in range(n):
                b, h = f"{stack}blocks.{i}.", f"{theirs}layers.{i}."
                a = f"{h}self_attn."
                out += [(f"{b}attn.qkv.{kind}", tuple(f"{a}{x}_proj.{kind}" for x in "qkv"), "cat"),
                        (f"{b}attn.proj.{kind}", (f"{a}out_proj.{kind}",), "copy"),
                        (f"{b}norm1.{kind}", (f"{h}self_attn_layer_norm.{kind}",), "copy"),
                        (f"{b}mlp.fc.{kind}", (f"{h}fc1.{kind}",), "copy"),
                        (f"{b}mlp.proj.{kind}", (f"{h}fc2.{kind}",), "copy"),
                        (f"{b}norm2.{kind}", (f"{h}final_layer_norm.{kind}",), "copy")]
                if stack:
                    c = f"{h}encoder_attn."
                    out += [(f"{b}cross_attn.q.{kind}", (f"{c}q_proj.{kind}",), "copy"),
                            (f"{b}cross_attn.kv.{kind}", (f"{c}k_proj.{kind}", f"{c}v_proj.{kind}"), "cat"),
                            (f"{b}cross_attn.proj.{kind}", (f"{c}out_proj.{kind}",), "copy"),
                            (f"{b}norm_cross.{kind}", (f"{h}encoder_attn_layer_norm.{kind}",), "copy")]
    return out
