"""GGUF files, the format of llama.cpp, Ollama and LM Studio: `lmforge export --format gguf`,
`lmforge import model.gguf` and `lmforge.load("model.gguf")`, written and read with the `gguf`
package (the format's own Python library).

lmforge configs map onto these llama.cpp architectures (anything else is refused, naming what
llama.cpp would need):

    gpt2   learned positions, LayerNorm, tanh GELU, biases everywhere          GPT-2
    llama  RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases          Llama 1-3, SmolLM,
                                                                              Mistral (no sliding window)
    qwen2  the llama layout plus q/k/v biases                                  Qwen2, Qwen2.5
    qwen3  the llama layout plus a per-head RMSNorm on queries and keys        Qwen3

Rotary layout: lmforge (like Hugging Face) rotates the pairs (i, i + d/2) of each head; llama.cpp's
`llama` rotates adjacent pairs (2i, 2i+1), so the query and key rows of each head are reordered on
the way out and back on the way in. `qwen2`/`qwen3` rotate halves as lmforge does: no reordering.

The tokenizer travels as GGUF's "gpt2" (byte-level BPE) vocabulary: tokens, merges, token types,
special ids and the chat template, with the pre-tokenizer named by the identity llama.cpp knows:
GPT-2's own split -> "gpt-2"; GPT-4's split (lmforge's tokenizer, Llama 3) -> "llama-bpe"; the
same with single digits (Qwen2) -> "qwen2".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path, atomic_write
from ..models.config import ModelConfig
from ..text.tokenizer import Tokenizer
from .gguf_vocab import tokenizer_metadata
from .hf import expected_tensors
from .kinds import is_adapter, kind_of
from .modeldir import load_model_dir, read_config

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
ACTIVATION_KEY = "lmforge.activation"  # an lmforge GPT-2 with exact GELU (llama.cpp ignores the key)
ROPE_KEY = "lmforge.rope_scaling"  # Llama 3's rope scaling as lmforge states it (llama.cpp reads rope_freqs)
ARCHES = ("gpt2", "llama", "qwen2", "qwen3")

def is_gguf(path: str | Path) -> bool:
    """A file whose name ends in .gguf or that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# --- architecture -----------------------------------------------------------------------------------

def gguf_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what this config does, or a one-line error."""
    if not cfg.causal:
        raise LMForgeError("GGUF export needs a decoder (causal language model); encoders have no llama.cpp "
                           "architecture lmforge can write")
    common = [(cfg.norm_position == "pre", "pre-norm blocks"), (not cfg.type_vocab_size, "no token types"),
              (not cfg.embedding_norm, "no embedding norm"), (not cfg.head_transform, "no output-head transform"),
              (not cfg.lm_head_bias, "no output-layer bias"),
              (cfg.sliding_window is None or cfg.sliding_window >= cfg.context_length, "no sliding window")]
    if cfg.pos_embedding == "learned":
        arch = "gpt2"
        need = [(cfg.norm == "layernorm", "LayerNorm"), (cfg.mlp == "plain", "a plain MLP"),
                (cfg.activation in ("gelu_tanh", "gelu"), "GELU"), (not cfg.qk_norm, "no q/k norm"),
                (cfg.bias and cfg.qkv_bias and cfg.proj_bias and cfg.mlp_bias, "biases in every layer"),
                (cfg.n_kv_head == cfg.n_head, "one key/value head per query head")]
    elif cfg.pos_embedding == "rope":
        arch = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
        need = [(cfg.norm == "rmsnorm", "RMSNorm"), (cfg.mlp == "gated", "a gated MLP"),
                (cfg.activation == "silu", "SiLU"), (not cfg.proj_bias, "no output-projection bias"),
                (not cfg.mlp_bias, "no MLP biases"), (not (cfg.qk_norm and cfg.qkv_bias), "no q/k/v biases"),
                ((cfg.rope_scaling or {}).get("type", "linear") in ("linear", "llama3", "factors"),
                 "rope scaling that is linear, Llama 3's or per-frequency")]
    else:
        raise LMForgeError("GGUF export needs learned (gpt2) or rotary (llama) positions; this model has none")
    missing = [what for ok, what in common + need if not ok]
    if missing:
        raise LMForgeError(f"cannot export to GGUF: llama.cpp's {arch} architecture needs {', '.join(missing)}, "
                           "which this model does not have")
    return arch


def tensor_plan(cfg: ModelConfig, arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """(lmforge tensor, GGUF tensors): several GGUF names mean lmforge's fused matrix split by rows."""
    plan = [("wte.weight", ("token_embd.weight",)), ("wpe.weight", ("position_embd.weight",))]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            qkv = (f"{g}attn_qkv.{kind}",) if arch == "gpt2" else tuple(f"{g}attn_{x}.{kind}" for x in "qkv")
            fc = (f"{g}ffn_up.{kind}",) if arch == "gpt2" else (f"{g}ffn_gate.{kind}", f"{g}ffn_up.{kind}")
            plan += [(f"{b}norm1.{kind}", (f"{g}attn_norm.{kind}",)), (f"{b}attn.qkv.{kind}", qkv),
                     (f"{b}attn.proj.{kind}", (f"{g}attn_output.{kind}",)),
                     (f"{b}norm2.{kind}", (f"{g}ffn_norm.{kind}",)), (f"{b}mlp.fc.{kind}", fc),
                     (f"{b}mlp.proj.{kind}", (f"{g}ffn_down.{kind}",))]
        plan += [(f"{b}attn.q_norm.weight", (f"{g}attn_q_norm.weight",)),
                 (f"{b}attn.k_norm.weight", (f"{g}attn_k_norm.weight",))]
    plan += [("norm.weight", ("output_norm.weight",)), ("norm.bias", ("output_norm.bias",)),
             ("lm_head.weight", ("output.weight",))]  # absent when tied: llama.cpp then reuses token_embd
    expected = expected_tensors(cfg)
    return [(ours, theirs) for ours, theirs in plan if ours in expected]


def _split_sizes(cfg: ModelConfig, ours: str) -> list[int]:
    if ".qkv." in ours:
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _pairs_adjacent(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _pairs_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `_pairs_adjacent`."""
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs: per frequency, the divisor that turns the plain rotary frequency into
    the scaled one (Llama 3.1's scaling, as llama.cpp's converter writes it)."""
    from ..models.transformer import rope_frequencies

    plain = rope_frequencies(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}))
    return (plain / rope_frequencies(cfg)).float()


def tensors_to_gguf(cfg: ModelConfig, arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge's state dict under llama.cpp's names and layouts (fp32)."""
    out = {}
    for ours, theirs in tensor_plan(cfg, arch):
        t = sd[ours].detach().float()
        parts = t.split(_split_sizes(cfg, ours)) if len(theirs) > 1 else (t,)
        for name, part in zip(theirs, parts):
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                part = _pairs_adjacent(part, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
            out[name] = part.contiguous()
    return out


def from_gguf_parts(cfg: ModelConfig, arch: str, theirs: tuple[str, ...], get) -> torch.Tensor:
    """One lmforge tensor from its GGUF parts (`get(name)` gives each, rows first): the inverse of
    `tensors_to_gguf` for it. Works on anything laid out by rows: weights, biases, and int4 values
    and group scales alike."""
    parts = []
    for name in theirs:
        t = get(name)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            t = _pairs_halves(t, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
        parts.append(t)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# --- writing -----------------------------------------------------------------------------------------

def _encode(name: str, t: torch.Tensor, outtype: str):
    """(array, GGML type) for one tensor: vectors stay f32 (as llama.cpp's converter keeps them);
    matrices become f16, q8_0 or q4_0 where rows split into blocks of 32 (else f16). With q4_0 the
    embedding and output matrices are q8_0: llama.cpp's own quantizer also keeps the output layer
    finer (Q6_K, which the gguf package cannot write), since errors there reach every logit."""
    import gguf

    T = gguf.GGMLQuantizationType
    a = t.numpy()
    if a.ndim == 1 or outtype == "f32":
        return a.astype(np.float32), T.F32
    qtype = None if outtype == "f16" else T[outtype.upper()]  # any type the gguf package quantises
    if outtype.startswith(("q4", "q5")) and name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0
    if qtype is not None and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return gguf.quants.quantize(a, qtype), qtype
    return a.astype(np.float16), T.F16


def _add(w, values: dict) -> None:
    """Each `key: value` through the writer's add_<key> (GGUF's typed key for it), in order; a None
    value is left out (the key does not apply)."""
    for key, value in values.items():
        if value is not None:
            getattr(w, f"add_{key}")(value)


def _write_metadata(w, cfg: ModelConfig, arch: str, name: str, outtype: str) -> None:
    import gguf

    _add(w, {"name": name, "context_length": cfg.context_length, "embedding_length": cfg.n_embd,
             "block_count": cfg.n_layer, "feed_forward_length": cfg.intermediate_size, "head_count": cfg.n_head,
             "vocab_size": cfg.vocab_size})
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        if cfg.activation == "gelu":  # llama.cpp computes GELU's tanh form; lmforge reads this key back
            w.add_string(ACTIVATION_KEY, "gelu")
            print("note: llama.cpp's gpt2 computes GELU in its tanh form (from an f16 table), this model the exact "
                  "one: llama.cpp's logits differ by about 1e-4 of their size", file=sys.stderr)
    else:
        _add(w, {"head_count_kv": cfg.n_kv_head, "key_length": cfg.head_dim, "value_length": cfg.head_dim,
                 "rope_dimension_count": cfg.head_dim, "rope_freq_base": cfg.rope_theta,
                 "layer_norm_rms_eps": cfg.norm_eps})
        if (cfg.rope_scaling or {}).get("type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
        elif cfg.rope_scaling:  # llama3 or factors: the tensor rope_freqs carries them; this key, the exact config
            w.add_string(ROPE_KEY, json.dumps(cfg.rope_scaling))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(w, tok: dict) -> None:
    scored = tok.get("scores") is not None  # a SentencePiece-style vocabulary: scores, no merges
    _add(w, {"tokenizer_model": tok["model"], "tokenizer_pre": tok.get("pre") or None, "token_list": tok["tokens"],
             "token_types": tok["types"], "token_merges": tok.get("merges"), "token_scores": tok.get("scores"),
             "add_space_prefix": tok["add_space_prefix"] if scored else None, "unk_token_id": tok.get("unk"),
             "bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "pad_token_id": tok["pad"],
             "eot_token_id": tok.get("eot"), "add_bos_token": tok["add_bos"], "add_eos_token": False,
             "chat_template": tok["template"] or None})


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", overwrite: bool = False,
                ollama: bool = False) -> Path:
    """Write an lmforge model directory as one GGUF file that llama.cpp runs unchanged; with
    `ollama`, also an Ollama Modelfile beside it (formats/ollama.py)."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise LMForgeError(f"unknown --outtype {outtype!r} (choose {', '.join(OUTTYPES)})")
    if out.exists() and not overwrite:
        raise LMForgeError(f"{out} exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise LMForgeError(f"{out} is a directory; GGUF export writes one file (e.g. --out model.gguf)")
    meta = read_config(model_dir)
    if is_adapter(meta):
        raise LMForgeError(f"{model_dir} is a LoRA adapter: merge it first (lmforge merge-lora {model_dir} --out DIR)")
    if not kind_of(meta).generates:
        raise LMForgeError(f"GGUF export needs a decoder (causal language model); {model_dir} is "
                           f"{kind_of(meta).phrase}")
    model, tokenizer, meta = load_model_dir(model_dir)
    recipe = None
    if ollama:  # before the GGUF file, so a template Ollama cannot state leaves nothing written
        from ..text.templates import template_from_json
        from .modeldir import stop_token_ids
        from .ollama import modelfile

        recipe = out.parent / "Modelfile"
        if recipe.exists() and not overwrite:
            raise LMForgeError(f"{recipe} exists (pass --overwrite to replace it)")
        text = modelfile(out.name, template_from_json(meta.get("chat_template"), tokenizer), tokenizer,
                         sorted(stop_token_ids(tokenizer, meta)))
    arch = write_gguf(model, tokenizer, meta, out, outtype, model_dir.resolve().name)
    print(f"exported {model_dir} as a GGUF ({arch}, {outtype}) to {out}", file=sys.stderr)
    if recipe is not None:
        atomic_write(recipe, text)
        print(f"wrote {recipe}: ollama create NAME -f {recipe}", file=sys.stderr)
    return out


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, meta: dict, out: str | Path, outtype: str = "f16",
               name: str = "lmforge") -> str:
    """Write a model in memory as one GGUF file (atomically); returns the llama.cpp architecture."""
    import gguf

    cfg = model.cfg
    arch = gguf_arch(cfg)
    tok = tokenizer_metadata(tokenizer, meta, cfg.vocab_size)
    tensors = tensors_to_gguf(cfg, arch, model.state_dict())
    if (cfg.rope_scaling or {}).get("type") in ("llama3", "factors"):
        tensors["rope_freqs.weight"] = rope_factors(cfg)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _write_metadata(w, cfg, arch, name, outtype)
        _write_tokenizer(w, tok)
        for tensor_name, t in tensors.items():
            data, qtype = _encode(tensor_name, t, outtype)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return arch

