"""Hugging Face checkpoint layouts <-> lmforge: configs and weight names, family by family.

Pure mapping, no files (see `hf_dir.py` for directories). Each family is a plan: for every
lmforge tensor, which Hugging Face tensors it comes from and how (copy, transpose, or
concatenate: lmforge fuses q/k/v and gate/up projections into single matmuls).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import torch

from ..core.errors import LMForgeError
from ..models.config import ModelConfig
from ..models.transformer import Transformer
from . import hf_seq2seq
from .hf_seq2seq import SEQ2SEQ
from .kinds import Kind

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = ("gpt2",) + LLAMA_LIKE + ("bert",) + SEQ2SEQ
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu", "relu2": "relu2", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "relu2": "relu2", "silu": "silu"}


def _require(c: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in c]
    if missing:
        raise LMForgeError(f"config.json lacks {', '.join(missing)}")


def _activation(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise LMForgeError(f"unsupported activation {name!r} (supported: {', '.join(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


def _rope(c: dict) -> tuple[float, dict | None]:
    """rope theta and scaling from either the classic keys or transformers 5's `rope_parameters`."""
    params = c.get("rope_parameters") or {}
    theta = c.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), {"type": "llama3", **{k: scaling[k] for k in keep}}
    raise LMForgeError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


def config_from_hf(c: dict) -> ModelConfig:
    """lmforge's ModelConfig for a Hugging Face `config.json`."""
    family = c.get("model_type")
    if family not in SUPPORTED:
        raise LMForgeError(f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED)}")
    extra = {"hf_family": family}
    if family in SEQ2SEQ:
        return hf_seq2seq.config_from_hf(c, _activation)
    if family == "bert":
        _require(c, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise LMForgeError(f"BERT with position_embedding_type {c['position_embedding_type']!r} is not supported")
        return ModelConfig(
            vocab_size=c["vocab_size"], context_length=c.get("max_position_embeddings", 512),
            n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
            intermediate_size=c["intermediate_size"], norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
            mlp="plain", activation=_activation(c.get("hidden_act", "gelu")), pos_embedding="learned", bias=True,
            causal=False, norm_position="post", type_vocab_size=c.get("type_vocab_size", 2), embedding_norm=True,
            tie_embeddings=True, extra=extra)
    if family == "gpt2":
        _require(c, "vocab_size", "n_embd", "n_layer", "n_head")
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
            raise LMForgeError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                               "are not supported")
        return ModelConfig(
            vocab_size=c["vocab_size"], context_length=c.get("n_positions", 1024), n_layer=c["n_layer"],
            n_head=c["n_head"], n_embd=c["n_embd"], intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
            norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp="plain",
            activation=_activation(c.get("activation_function", "gelu_new")), pos_embedding="learned",
            bias=True, tie_embeddings=c.get("tie_word_embeddings", True), extra=extra)
    _require(c, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    theta, scaling = _rope(c)
    if c.get("use_sliding_window"):
        raise LMForgeError(f"{family} with use_sliding_window=true is not supported")
    attention_bias = bool(c.get("attention_bias", False))
    n_head = c["num_attention_heads"]
    return ModelConfig(
        vocab_size=c["vocab_size"], context_length=c.get("max_position_embeddings", 2048),
        n_layer=c["num_hidden_layers"], n_head=n_head, n_kv_head=c.get("num_key_value_heads") or n_head,
        n_embd=c["hidden_size"], head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        intermediate_size=c["intermediate_size"], norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
        mlp="gated", activation=_activation(c.get("hidden_act", "silu")), pos_embedding="rope",
        rope_theta=theta, rope_scaling=scaling, bias=False,
        qkv_bias=True if family == "qwen2" else attention_bias,
        proj_bias=False if family == "qwen2" else attention_bias, mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=family == "qwen3", tie_embeddings=c.get("tie_word_embeddings", False),
        sliding_window=c.get("sliding_window") if family == "mistral" else None, extra=extra)


def export_family(cfg: ModelConfig) -> str:
    """The Hugging Face family that expresses this config exactly."""
    fam = cfg.extra.get("hf_family")
    if fam in SUPPORTED:
        return fam
    if cfg.is_encoder_decoder:
        return hf_seq2seq.export_family(cfg)
    if cfg.logit_softcap:
        raise LMForgeError("logit soft-capping (logit_softcap) has no equivalent in the Hugging Face families "
                           "lmforge exports (gpt2, llama, mistral, qwen2, qwen3)")
    if cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "plain" and cfg.causal \
            and cfg.n_kv_head == cfg.n_head and cfg.bias and not cfg.lm_head_bias:
        if cfg.qk_norm:
            raise LMForgeError("QK-norm has no equivalent in Hugging Face's GPT-2 (a llama-family model with "
                               "QK-norm exports as Qwen3)")
        return "gpt2"
    if cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "gated" and cfg.causal:
        if cfg.qk_norm:
            return "qwen3"
        if cfg.qkv_bias and not cfg.proj_bias:
            return "qwen2"
        if cfg.sliding_window:
            return "mistral"
        return "llama"
    raise LMForgeError("this model's architecture has no Hugging Face equivalent lmforge can export")


def config_to_hf(cfg: ModelConfig, family: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None) -> dict:
    if family in SEQ2SEQ:
        return hf_seq2seq.config_to_hf(cfg, family, bos_id, eos_id, pad_id, _ACT_TO_HF)
    arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    common = {"architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
              "bos_token_id": bos_id, "eos_token_id": eos_id, "tie_word_embeddings": cfg.tie_embeddings,
              "torch_dtype": "float32"}
    if family == "gpt2":
        return {**common, "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,
                "activation_function": _ACT_TO_HF[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    out = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": _ACT_TO_HF[cfg.activation], "rope_theta": cfg.rope_theta, "attention_dropout": 0.0}
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "factors":
        raise LMForgeError("this model's rope scaling is a list of per-frequency factors (from a GGUF file), which "
                           "Hugging Face's config cannot state; export it as GGUF instead")
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": cfg.rope_scaling["type"],
                               **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    if family in ("llama", "mistral"):
        if cfg.qkv_bias != cfg.proj_bias:
            raise LMForgeError(f"{family} cannot express q/k/v biases without an output-projection bias")
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    if family == "qwen3":
        out["attention_bias"] = cfg.qkv_bias
    return out


# --- weights ---------------------------------------------------------------------------------------

def _plan(cfg: ModelConfig, family: str, prefix: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(lmforge name, Hugging Face names, how) for every tensor: how is copy, t (transpose) or cat."""
    plan = []
    if family in SEQ2SEQ:
        plan = hf_seq2seq.plan(cfg, family)
    elif family == "bert":
        e = "embeddings."
        plan += [("wte.weight", (f"{e}word_embeddings.weight",), "copy"),
                 ("wpe.weight", (f"{e}position_embeddings.weight",), "copy"),
                 ("wtt.weight", (f"{e}token_type_embeddings.weight",), "copy"),
                 ("emb_norm.weight", (f"{e}LayerNorm.weight",), "copy"),
                 ("emb_norm.bias", (f"{e}LayerNorm.bias",), "copy")]
        for i in range(cfg.n_layer):
            h, b = f"encoder.layer.{i}.", f"blocks.{i}."
            a = h + "attention."
            for kind in ("weight", "bias"):
                qkv = tuple(f"{a}self.{x}.{kind}" for x in ("query", "key", "value"))
                plan += [(f"{b}attn.qkv.{kind}", qkv, "cat"),
                         (f"{b}attn.proj.{kind}", (f"{a}output.dense.{kind}",), "copy"),
                         (f"{b}norm1.{kind}", (f"{a}output.LayerNorm.{kind}",), "copy"),
                         (f"{b}mlp.fc.{kind}", (f"{h}intermediate.dense.{kind}",), "copy"),
                         (f"{b}mlp.proj.{kind}", (f"{h}output.dense.{kind}",), "copy"),
                         (f"{b}norm2.{kind}", (f"{h}output.LayerNorm.{kind}",), "copy")]
        t = "cls.predictions."  # the masked-LM head (BertForMaskedLM); its decoder is the tied embedding
        plan += [("head_dense.weight", (f"{t}transform.dense.weight",), "copy"),
                 ("head_dense.bias", (f"{t}transform.dense.bias",), "copy"),
                 ("head_norm.weight", (f"{t}transform.LayerNorm.weight",), "copy"),
                 ("head_norm.bias", (f"{t}transform.LayerNorm.bias",), "copy"), ("lm_head.bias", (f"{t}bias",), "copy")]
    elif family == "gpt2":  # GPT-2's Conv1D layers store weights as [in, out]: transpose them
        plan += [("wte.weight", ("wte.weight",), "copy"), ("wpe.weight", ("wpe.weight",), "copy")]
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                plan += [(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), "copy"),
                         (f"{b}{ours}.bias", (f"{h}{theirs}.bias",), "copy")]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                plan += [(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), "t"),
                         (f"{b}{ours}.bias", (f"{h}{theirs}.bias",), "copy")]
        plan += [("norm.weight", ("ln_f.weight",), "copy"), ("norm.bias", ("ln_f.bias",), "copy"),
                 ("lm_head.weight", ("lm_head.weight",), "copy")]  # only when untied (see `expected` below)
    else:
        plan.append(("wte.weight", ("model.embed_tokens.weight",), "copy"))
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            a = h + "self_attn."
            for kind in ("weight", "bias"):
                qkv = (f"{a}q_proj.{kind}", f"{a}k_proj.{kind}", f"{a}v_proj.{kind}")
                plan += [(f"{b}attn.qkv.{kind}", qkv, "cat"),
                         (f"{b}attn.proj.{kind}", (f"{a}o_proj.{kind}",), "copy"),
                         (f"{b}mlp.fc.{kind}", (f"{h}mlp.gate_proj.{kind}", f"{h}mlp.up_proj.{kind}"), "cat"),
                         (f"{b}mlp.proj.{kind}", (f"{h}mlp.down_proj.{kind}",), "copy")]
            plan += [(f"{b}norm1.weight", (f"{h}input_layernorm.weight",), "copy"),
                     (f"{b}norm2.weight", (f"{h}post_attention_layernorm.weight",), "copy"),
                     (f"{b}attn.q_norm.weight", (f"{a}q_norm.weight",), "copy"),
                     (f"{b}attn.k_norm.weight", (f"{a}k_norm.weight",), "copy")]
        plan += [("norm.weight", ("model.norm.weight",), "copy"), ("lm_head.weight", ("lm_head.weight",), "copy")]
    expected = set(expected_tensors(cfg))
    return [(ours, tuple(prefix + t if not t.startswith(("lm_head", "cls.")) else t for t in theirs), how)
            for ours, theirs, how in plan if ours in expected]


def expected_tensors(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of the tensors an lmforge model of this config stores."""
    with torch.device("meta"):
        sd = Transformer(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.shape for k, v in sd.items()}


def hf_prefix(family: str, names: set[str]) -> str:
    """GPT-2 and BERT checkpoints come with or without a prefix (`transformer.`, `bert.`), depending on
    whether the bare model or one with a head was saved."""
    for fam, prefix in (("gpt2", "transformer."), ("bert", "bert.")):
        if family == fam and any(n.startswith(prefix) for n in names):
            return prefix
    return ""


def adapt_to_weights(cfg: ModelConfig, family: str, names: set[str]) -> tuple[ModelConfig, Kind]:
    """Settle what config.json leaves open: whether a BERT checkpoint carries its masked-LM head, and
    whether an encoder-decoder's output layer is its own (lm_head.weight stored) or the embedding.
    Returns the config and the kind of model."""
    if family in SEQ2SEQ:
        return dataclasses.replace(cfg, tie_embeddings="lm_head.weight" not in names), Kind.SEQ2SEQ
    if family != "bert":
        return cfg, Kind.CAUSAL_LM
    if "cls.predictions.transform.dense.weight" in names:
        return dataclasses.replace(cfg, head_transform=True, lm_head_bias=True), Kind.MASKED_LM
    return cfg, Kind.ENCODER


def legacy_names(names: set[str]) -> dict[str, str]:
    """Old BERT checkpoints call LayerNorm parameters gamma/beta: map modern names to them; an
    encoder-decoder's shared embedding may be stored under its encoder's name only."""
    out = {}
    for n in names:
        if n.endswith("encoder.embed_tokens.weight"):
            out.setdefault(n.replace("encoder.embed_tokens", "shared"), n)
        if n.endswith("LayerNorm.gamma"):
            out[n[:-5] + "weight"] = n
        elif n.endswith("LayerNorm.beta"):
            out[n[:-4] + "bias"] = n
    return out


class TensorSource(Protocol):
    """Where Hugging Face tensors come from: a checkpoint on disk, or a state dict in memory."""

    names: set[str]

    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor: ...


class DictSource:
    """A state dict as a TensorSource (e.g. a transformers model already in memory)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd, self.names = sd, set(sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.sd[name] if out is None else out.copy_(self.sd[name])


def weights_from_hf(cfg: ModelConfig, family: str, source: TensorSource,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield lmforge tensors one at a time (streaming). Concatenated matrices are allocated once and
    each Hugging Face part is read straight into its slice, so no tensor is ever held twice."""
    names = source.names
    alias = legacy_names(names)
    for ours, theirs, how in _plan(cfg, family, hf_prefix(family, names)):
        theirs = tuple(alias.get(t, t) for t in theirs)
        missing = [t for t in theirs if t not in names]
        if missing:
            raise LMForgeError(f"the checkpoint lacks tensor {missing[0]}")
        to = dtype or source.dtype(theirs[0])
        if how == "cat":
            shapes = [source.shape(t) for t in theirs]
            if any(s[1:] != shapes[0][1:] for s in shapes):
                raise LMForgeError(f"tensors {', '.join(theirs)} do not fit together (shapes {shapes})")
            out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=to)
            row = 0
            for t, s in zip(theirs, shapes):
                source.read(t, out[row:row + s[0]])
                row += s[0]
            yield ours, out
        elif how == "t":
            yield ours, source.read(theirs[0]).t().to(to).contiguous()
        elif how == "row":
            yield ours, source.read(theirs[0]).reshape(-1).to(to)
        else:
            yield ours, source.read(theirs[0]).to(to)


def weights_to_hf(cfg: ModelConfig, family: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    prefix = "transformer." if family == "gpt2" else ""
    for ours, theirs, how in _plan(cfg, family, prefix):
        t = sd[ours]
        if how == "t":
            out[theirs[0]] = t.t().contiguous()
        elif how == "row":
            out[theirs[0]] = t[None].contiguous()
        elif how == "cat":
            if ".qkv." in ours:
                sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
            elif ".kv." in ours:
                sizes = [cfg.n_kv_head * cfg.head_dim] * 2
            else:
                sizes = [cfg.intermediate_size, cfg.intermediate_size]
            for name, part in zip(theirs, t.split(sizes, dim=0)):
                out[name] = part.contiguous()
        else:
            out[theirs[0]] = t.contiguous()
    return out
