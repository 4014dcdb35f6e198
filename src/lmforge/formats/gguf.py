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
from ..core.fileio import atomic_path, atomic_write_json, staged_dir
from ..models.config import ModelConfig
from ..text.tokenizer import SPLIT_PATTERN, Tokenizer
from .hf import expected_tensors
from .kinds import Kind, is_adapter, kind_of
from .modeldir import build_model, load_model_dir, model_config_json, read_config, save_weights, weights_for_saving

OUTTYPES = ("f32", "f16", "q8_0")
ACTIVATION_KEY = "lmforge.activation"  # an lmforge GPT-2 with exact GELU (llama.cpp ignores the key)
ARCHES = ("gpt2", "llama", "qwen2", "qwen3")
QWEN_SPLIT = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: numbers one digit at a time
PRE_PATTERNS = {"llama-bpe": SPLIT_PATTERN, "qwen2": QWEN_SPLIT}  # "gpt-2": ByteLevel's own regex
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
CHATML = ("{%- for message in messages -%}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


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
                ((cfg.rope_scaling or {}).get("type", "linear") == "linear", "no rope scaling other than linear")]
    else:
        raise LMForgeError("GGUF export needs learned (gpt2) or rotary (llama) positions; this model has none")
    missing = [what for ok, what in common + need if not ok]
    if missing:
        raise LMForgeError(f"cannot export to GGUF: llama.cpp's {arch} architecture needs {', '.join(missing)}, "
                           "which this model does not have")
    return arch


def _plan(cfg: ModelConfig, arch: str) -> list[tuple[str, tuple[str, ...]]]:
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


def tensors_to_gguf(cfg: ModelConfig, arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge's state dict under llama.cpp's names and layouts (fp32)."""
    out = {}
    for ours, theirs in _plan(cfg, arch):
        t = sd[ours].detach().float()
        parts = t.split(_split_sizes(cfg, ours)) if len(theirs) > 1 else (t,)
        for name, part in zip(theirs, parts):
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                part = _pairs_adjacent(part, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
            out[name] = part.contiguous()
    return out


def tensors_from_gguf(cfg: ModelConfig, arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `tensors_to_gguf`."""
    out = {}
    for ours, theirs in _plan(cfg, arch):
        missing = [t for t in theirs if t not in tensors]
        if missing:
            raise LMForgeError(f"the GGUF file lacks tensor {missing[0]}")
        parts = []
        for name in theirs:
            t = tensors[name]
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                t = _pairs_halves(t, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
            parts.append(t)
        out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


# --- tokenizer ---------------------------------------------------------------------------------------

def _pre_identity(tok: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (how text is split before BPE)."""
    pre, norm = tok.get("pre_tokenizer") or {}, tok.get("normalizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not norm:
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and parts[0].get("behavior") == "Isolated":
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern == SPLIT_PATTERN and not norm:
            return "llama-bpe"
        if pattern == QWEN_SPLIT and (not norm or norm.get("type") == "NFC"):
            return "qwen2"
    raise LMForgeError("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows (supported: "
                       "GPT-2's byte-level split, GPT-4/Llama 3's split, Qwen2's split)")


def _chat_template(tokenizer: Tokenizer, meta: dict) -> str | None:
    """Jinja text for tokenizer.chat_template: the model's own, or chatml written out as Jinja."""
    mine = meta.get("chat_template") or {}
    if mine.get("name") == "jinja":
        return mine.get("source")
    if mine.get("name") == "chatml":
        return CHATML
    if mine.get("name") == "alpaca":
        print("note: the alpaca prompt format has no Jinja template in GGUF; the file carries none",
              file=sys.stderr)
        return None
    source = tokenizer.config.get("chat_template")
    if isinstance(source, list):
        source = next((t["template"] for t in source if t.get("name") == "default"), source[0]["template"])
    return source or None


def tokenizer_metadata(tokenizer: Tokenizer, meta: dict, n_rows: int) -> dict:
    """GGUF's tokenizer.* keys for a byte-level BPE tokenizer, the token list padded to the model's
    `n_rows` embedding rows with unused `[PAD{i}]` entries (llama.cpp wants one token per row)."""
    tok = json.loads(tokenizer.hf.to_str())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or tokenizer._byte_decoder is None:
        raise LMForgeError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen style); "
                           f"this one is a {model.get('type')} tokenizer"
                           f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    pre = _pre_identity(tok)
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_rows):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(piece)
            types.append(NORMAL if i not in added else CONTROL if added[i]["special"] else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer.encode("a", add_special_tokens=True)
    add_bos = len(probe) > 1 and probe[0] in tokenizer.special_ids  # the post-processor prepends a BOS
    stop = sorted({tokenizer.eot_id, *meta.get("stop_token_ids", [])})
    out = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
           "bos": probe[0] if add_bos else tokenizer.eot_id, "eos": tokenizer.eot_id, "pad": tokenizer.pad_id,
           "add_bos": add_bos, "template": _chat_template(tokenizer, meta)}
    eot = [i for i in stop if i != tokenizer.eot_id]
    if eot:  # a chat model's end-of-turn marker (e.g. <|im_end|>): llama.cpp stops there too
        out["eot"] = eot[0]
    return out


def _tokenizer_from_gguf(f: dict) -> tuple[Tokenizer, list[int]]:
    """An lmforge Tokenizer (as tokenizer.json + tokenizer_config.json would give) from GGUF's
    tokenizer.* keys, and the ids that end a generation."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LMForgeError(f"unsupported GGUF tokenizer model {kind!r} (lmforge reads byte-level BPE: 'gpt2')")
    pre = f.get("tokenizer.ggml.pre", "gpt-2")
    if pre != "gpt-2" and pre not in PRE_PATTERNS:
        raise LMForgeError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt-2, {', '.join(PRE_PATTERNS)})")
    tokens, merges = f["tokenizer.ggml.tokens"], f.get("tokenizer.ggml.merges", [])
    types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != UNUSED}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    if pre == "gpt-2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    name = lambda key: tokens[f[key]] if isinstance(f.get(key), int) and f[key] < len(tokens) else None  # noqa: E731
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    if f.get("tokenizer.ggml.add_bos_token") and bos:
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab[bos])])
    config = {"bos_token": bos, "eos_token": eos, "pad_token": name("tokenizer.ggml.padding_token_id"),
              "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token"))}
    if f.get("tokenizer.chat_template"):
        config["chat_template"] = f["tokenizer.chat_template"]
    stops = [f[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
             if isinstance(f.get(k), int) and f[k] < len(vocab)]
    return Tokenizer(hf, {k: v for k, v in config.items() if v is not None}), stops


# --- writing -----------------------------------------------------------------------------------------

def _encode(t: torch.Tensor, outtype: str):
    """(array, GGML type) for one tensor: vectors stay f32 (as llama.cpp's converter keeps them);
    matrices become f16 or q8_0 (q8_0 only where rows split into its blocks of 32, else f16)."""
    import gguf

    a = t.numpy()
    if a.ndim == 1 or outtype == "f32":
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def _write_metadata(w, cfg: ModelConfig, arch: str, name: str, outtype: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        if cfg.activation == "gelu":  # llama.cpp computes GELU's tanh form; lmforge reads this key back
            w.add_string(ACTIVATION_KEY, "gelu")
            print("note: llama.cpp's gpt2 computes GELU in its tanh form (from an f16 table), this model the exact "
                  "one: llama.cpp's logits differ by about 1e-4 of their size", file=sys.stderr)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.rope_scaling:  # linear (checked by gguf_arch)
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(w, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    if "eot" in tok:
        w.add_eot_token_id(tok["eot"])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    if tok["template"]:
        w.add_chat_template(tok["template"])


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write an lmforge model directory as one GGUF file that llama.cpp runs unchanged."""
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
        raise LMForgeError(f"GGUF export needs a decoder (causal language model); {model_dir} is a {kind_of(meta)}")
    model, tokenizer, meta = load_model_dir(model_dir)
    arch = write_gguf(model, tokenizer, meta, out, outtype, model_dir.resolve().name)
    print(f"exported {model_dir} as a GGUF ({arch}, {outtype}) to {out}", file=sys.stderr)
    return out


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, meta: dict, out: str | Path, outtype: str = "f16",
               name: str = "lmforge") -> str:
    """Write a model in memory as one GGUF file (atomically); returns the llama.cpp architecture."""
    import gguf

    cfg = model.cfg
    arch = gguf_arch(cfg)
    tok = tokenizer_metadata(tokenizer, meta, cfg.vocab_size)
    tensors = tensors_to_gguf(cfg, arch, model.state_dict())
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _write_metadata(w, cfg, arch, name, outtype)
        _write_tokenizer(w, tok)
        for tensor_name, t in tensors.items():
            data, qtype = _encode(t, outtype)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return arch


# --- reading -----------------------------------------------------------------------------------------

def _read(path: Path):
    """(metadata dict, {name: ReaderTensor}) of a GGUF file, or a one-line error if it is not one."""
    import gguf

    if not path.is_file():
        raise LMForgeError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(path)
        fields = {k: v.contents() for k, v in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
        for t in tensors.values():  # a truncated file maps short arrays
            if t.data.size * t.data.itemsize < t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad files
        raise LMForgeError(f"{path} is not a valid GGUF file (truncated or corrupt: {str(e).splitlines()[0]})") \
            from None
    kinds = gguf.GGMLQuantizationType
    for t in tensors.values():
        if t.tensor_type not in (kinds.F32, kinds.F16, kinds.BF16, kinds.Q8_0):
            raise LMForgeError(f"{path}: tensor {t.name} has quantisation type {t.tensor_type.name}; lmforge reads "
                               "F32, F16, BF16 and Q8_0")
    return fields, tensors


def _dequantize(t) -> torch.Tensor:
    import gguf

    a = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.array(a, dtype=np.float32)).reshape(shape)  # a copy: the reader's map is read-only


def _f32(v) -> float:
    """A float GGUF stored as float32, as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(f: dict, tensors: dict) -> tuple[ModelConfig, str]:
    arch = f.get("general.architecture")
    if arch not in ARCHES:
        raise LMForgeError(f"unsupported GGUF architecture {arch!r} (lmforge reads {', '.join(ARCHES)})")

    def key(k: str, default=None):
        v = f.get(f"{arch}.{k}", default)
        if v is None:
            raise LMForgeError(f"the GGUF file lacks {arch}.{k}")
        return v

    if "token_embd.weight" not in tensors:
        raise LMForgeError("the GGUF file lacks tensor token_embd.weight")
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    common = dict(vocab_size=int(tensors["token_embd.weight"].shape[1]), context_length=int(key("context_length")),
                  n_layer=int(key("block_count")), n_head=n_head, n_embd=n_embd,
                  intermediate_size=int(key("feed_forward_length")), tie_embeddings="output.weight" not in tensors)
    if arch == "gpt2":
        return ModelConfig(**common, norm="layernorm", norm_eps=_f32(key("attention.layer_norm_epsilon")),
                           mlp="plain", activation="gelu" if f.get(ACTIVATION_KEY) == "gelu" else "gelu_tanh",
                           pos_embedding="learned", bias=True), arch
    scaling = None
    if f.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise LMForgeError(f"unsupported rope scaling {f[f'{arch}.rope.scaling.type']!r} (lmforge reads linear)")
    if f.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:
        raise LMForgeError("GGUF files with per-frequency rope factors (Llama 3.1 style) are not supported")
    head_dim = int(f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") or n_embd // n_head)
    return ModelConfig(**common, n_kv_head=int(f.get(f"{arch}.attention.head_count_kv") or n_head), head_dim=head_dim,
                       norm="rmsnorm", norm_eps=_f32(key("attention.layer_norm_rms_epsilon")), mlp="gated",
                       activation="silu", pos_embedding="rope", rope_theta=_f32(f.get(f"{arch}.rope.freq_base", 1e4)),
                       rope_scaling=scaling, bias=False, qkv_bias="blk.0.attn_q.bias" in tensors,
                       qk_norm="blk.0.attn_q_norm.weight" in tensors), arch


def load_gguf(path: str | Path) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model, tokenizer, config.json contents) from a GGUF file, weights dequantised to fp32."""
    path = Path(path)
    f, readers = _read(path)
    cfg, arch = config_from_gguf(f, readers)
    tokenizer, stops = _tokenizer_from_gguf(f)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LMForgeError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                           f"{cfg.vocab_size} rows")
    tensors = tensors_from_gguf(cfg, arch, {n: _dequantize(t) for n, t in readers.items()})
    model = build_model(cfg, tensors, f"tensors in {path}")
    meta = model_config_json(model, tokenizer, kind=Kind.CAUSAL_LM, created_by=f"lmforge import (gguf {arch})",
                             stop_token_ids=stops)
    return model.eval(), tokenizer, meta


def import_gguf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a GGUF file into an lmforge model directory (tokenizer rebuilt as tokenizer.json)."""
    model, tokenizer, meta = load_gguf(src)
    with staged_dir(out, overwrite) as tmp:
        atomic_write_json(tmp / "config.json", meta)
        tokenizer.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer.config)
        save_weights(weights_for_saving(model), tmp / "model.safetensors")
    return Path(out)
