"""Reading GGUF files: `lmforge import model.gguf` and `lmforge.load("model.gguf")`.

Every common weight type is read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K),
dequantised by the `gguf` package's own routines. What the weights become in memory (`quantize`):

    auto   (the default) as close to the file as lmforge's kernels go, tensor by tensor:
           4-bit and smaller types (Q4_*, Q5_*, Q2_K, Q3_K) -> int4 groups of 32; Q6_K and Q8_0 ->
           int8 rows; F32/F16/BF16 -> fp32. A layer fused from parts of mixed types (Q4_K_M's qkv)
           takes the finest of them.
    int4   every linear layer int4;   int8: every one int8;   none: all fp32.

Q4_0, Q4_1 and Q4_K store w = step * q + offset, q in 0..15, in groups of 32 along a row: exactly
`Int4Linear`'s form, so they load as the very 4-bit values llama.cpp multiplies, not requantised.
The step and offset of each group are read through the package's own dequantiser, by decoding
copies of the blocks whose 4-bit values are set to all 0s and all 1s (the values are each block's
last bytes in all three layouts). Other types are dequantised and then quantised.

The load streams: one tensor's bytes are read at a time (`os.pread`, not a memory map, so file
pages do not count against the process) and converted 64 rows at a time, so no fp32 copy of a
whole matrix is made and the peak is the loaded model plus one tensor's file bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write_json, staged_dir
from ..core.runtime import available_memory
from ..models.config import ModelConfig
from ..models.quant import Int4Linear, Int8Embedding, Int8Linear, quantize_groups, quantize_rows
from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .gguf import ACTIVATION_KEY, ARCHES, ROPE_KEY, from_gguf_parts, tensor_plan
from .gguf_vocab import tokenizer_from_gguf
from .kinds import Kind
from .modeldir import model_config_json, save_weights, weights_for_saving

QUANTIZE = ("auto", "none", "int8", "int4")
GROUP = 32  # the block of every 4-bit GGUF type


def _types():
    import gguf

    T = gguf.GGMLQuantizationType
    return T, {T.Q4_0, T.Q4_1, T.Q4_K}, {T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q2_K, T.Q3_K}, \
        {T.Q8_0, T.Q6_K}


def readable() -> list[str]:
    T, _, four, eight = _types()
    return [t.name for t in (T.F32, T.F16, T.BF16, *sorted(eight | four))]


def _read(path: Path):
    """(metadata dict, {name: ReaderTensor}) of a GGUF file, or a one-line error if it is not one."""
    import gguf

    if not path.is_file():
        raise LMForgeError(f"no such GGUF file: {path}")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        fields = {k: v.contents() for k, v in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception:  # the reader raises ValueError, IndexError, struct and numpy errors on bad files, whose
        # wording (reshapes, dtypes) says nothing to the user; a cut-short download is the usual cause
        magic = path.open("rb").read(4) == b"GGUF"
        raise LMForgeError(f"{path} is not a valid GGUF file: " + (
            f"its header or tensor table is cut short or corrupt ({size:,} bytes: an interrupted download or copy?)"
            if magic else "it does not start with the GGUF magic bytes")) from None
    for t in tensors.values():
        if t.data_offset + t.n_bytes > size:
            raise LMForgeError(f"{path} is not a valid GGUF file: truncated (tensor {t.name} runs past the end of "
                               f"the file's {size} bytes)")
    ok = set(readable())
    for t in tensors.values():
        if t.tensor_type.name not in ok:
            raise LMForgeError(f"{path}: tensor {t.name} has quantisation type {t.tensor_type.name}, which lmforge "
                               f"cannot read (it reads {', '.join(readable())})")
    return fields, tensors


def _f32(v) -> float:
    """A float GGUF stored as float32, as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(f: dict, tensors: dict, rope_freqs: list[float] | None = None) -> tuple[ModelConfig, str]:
    """The model config a GGUF file's metadata states (`rope_freqs`: the values of its rope_freqs tensor)."""
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
    if "rope_freqs.weight" in tensors:  # Llama 3.1's scaling: lmforge's own statement of it, else the factors
        scaling = json.loads(f[ROPE_KEY]) if ROPE_KEY in f else {"type": "factors", "factors": rope_freqs}
    head_dim = int(f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") or n_embd // n_head)
    return ModelConfig(**common, n_kv_head=int(f.get(f"{arch}.attention.head_count_kv") or n_head), head_dim=head_dim,
                       norm="rmsnorm", norm_eps=_f32(key("attention.layer_norm_rms_epsilon")), mlp="gated",
                       activation="silu", pos_embedding="rope", rope_theta=_f32(f.get(f"{arch}.rope.freq_base", 1e4)),
                       rope_scaling=scaling, bias=False, qkv_bias="blk.0.attn_q.bias" in tensors,
                       qk_norm="blk.0.attn_q_norm.weight" in tensors), arch


# --- tensors -----------------------------------------------------------------------------------------

class _Source:
    """Tensor data read from the file one tensor at a time."""

    def __init__(self, path: Path, infos: dict) -> None:
        self.path, self.infos = path, infos
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.infos[name].shape))  # GGUF lists dimensions innermost first

    def raw(self, name: str) -> np.ndarray:
        import gguf

        t = self.infos[name]
        data = np.frombuffer(os.pread(self.fd, int(t.n_bytes), int(t.data_offset)), dtype=np.uint8)
        if data.size < t.n_bytes:
            raise LMForgeError(f"{self.path} is truncated inside tensor {name}")
        return data.reshape(gguf.quant_shape_to_byte_shape(self.shape(name), t.tensor_type))

    def dequantized(self, name: str) -> torch.Tensor:
        """fp32, rows first, through the gguf package's dequantiser."""
        return torch.from_numpy(_dequantize(self.raw(name), self.infos[name].tensor_type).reshape(self.shape(name)))

    def int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scale, zero) as `Int4Linear` takes them: exact for Q4_0/Q4_1/Q4_K, else quantised from fp32."""
        _, exact, _, _ = _types()
        qtype = self.infos[name].tensor_type
        if qtype in exact:
            return self._by_rows(name, lambda rows: _nibbles(rows, qtype))
        return self._by_rows(name, lambda rows: quantize_groups(torch.from_numpy(_dequantize(rows, qtype)), GROUP))

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale) as `Int8Linear` and `Int8Embedding` take them."""
        qtype = self.infos[name].tensor_type
        return self._by_rows(name, lambda rows: quantize_rows(torch.from_numpy(_dequantize(rows, qtype))))

    def _by_rows(self, name: str, convert) -> tuple[torch.Tensor, ...]:
        """`convert` applied to 64 rows of the file's bytes at a time, so no fp32 copy of the whole matrix
        is ever made."""
        raw = self.raw(name)
        out = [convert(rows) for rows in np.array_split(raw, max(1, len(raw) // 64))]
        return tuple(torch.cat(parts) for parts in zip(*out))


def _dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """fp32 values of byte-shaped rows (a writable array torch can share)."""
    import gguf

    return np.require(gguf.quants.dequantize(raw, qtype), np.float32, ["C", "W"])


def _nibbles(raw: np.ndarray, qtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit values of Q4_0/Q4_1/Q4_K rows with each group's step and offset (w = step * q + offset),
    the latter two found by decoding copies of the blocks whose values are all 0 and all 1."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = raw.shape[0]
    blocks = raw.reshape(-1, size)
    n_q = block // 2  # the 4-bit values: the last block/2 bytes of every block

    def decoded(byte: int | None) -> torch.Tensor:
        b = blocks if byte is None else _with(blocks, n_q, byte)
        return torch.from_numpy(_dequantize(b.reshape(raw.shape), qtype)).reshape(n, -1, GROUP)

    offset = decoded(0x00)[..., 0]
    step = decoded(0x11)[..., 0] - offset
    step_or_1 = torch.where(step != 0, step, 1)  # Q4_0's steps can be negative; an all-equal group has none
    q = torch.round((decoded(None) - offset[..., None]) / step_or_1[..., None]).clamp(0, 15)
    return q.reshape(n, -1).to(torch.uint8), step, offset + 8 * step


def _with(blocks: np.ndarray, n_q: int, byte: int) -> np.ndarray:
    out = blocks.copy()
    out[:, -n_q:] = byte
    return out


def _plan(cfg: ModelConfig, arch: str, infos: dict) -> dict[str, tuple[str, ...]]:
    """{lmforge tensor: its GGUF tensors}, a tied output layer included (read from token_embd), or a
    one-line error naming a tensor the file lacks."""
    plan = dict(tensor_plan(cfg, arch))
    if cfg.tie_embeddings:
        plan["lm_head.weight"] = ("token_embd.weight",)
    missing = next((t for theirs in plan.values() for t in theirs if t not in infos), None)
    if missing:
        raise LMForgeError(f"the GGUF file lacks tensor {missing}")
    return plan


def _layer_modes(cfg: ModelConfig, plan: dict, infos: dict, quantize: str) -> dict[str, str | None]:
    """{lmforge weight name: "int4" | "int8" | None} for the linear layers and the embedding."""
    T, _, four, eight = _types()
    linears = [n for n in plan if n.endswith(".weight") and len(infos[plan[n][0]].shape) == 2
               and n not in ("wte.weight", "wpe.weight")]
    modes = {}
    for name in linears + ["wte.weight"]:
        types = {infos[t].tensor_type for t in plan[name]}
        if quantize == "auto":
            mode = "int8" if types & eight else "int4" if types <= four else None
        else:
            mode = None if quantize == "none" else quantize
        if mode == "int4" and cfg_width(cfg, name) % GROUP:
            mode = "int8"
        modes[name] = mode
    return modes


def cfg_width(cfg: ModelConfig, name: str) -> int:
    """The input width of the linear layer whose weight is `name`."""
    if name.endswith("mlp.proj.weight"):
        return cfg.intermediate_size
    if name.endswith("attn.proj.weight"):
        return cfg.n_head * cfg.head_dim
    return cfg.n_embd


def _nbytes(shape: tuple[int, ...], mode: str | None) -> int:
    n = int(np.prod(shape))
    return {"int4": n // 2 + n // GROUP * 4, "int8": n + shape[0] * 4}.get(mode, 4 * n)


def _shape(src: _Source, theirs: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of the lmforge tensor made of these GGUF tensors (fused ones are stacked by rows)."""
    return (sum(src.shape(t)[0] for t in theirs), *src.shape(theirs[0])[1:])


def memory_needed(plan: dict, src: _Source, modes: dict) -> int:
    return sum(_nbytes(_shape(src, theirs), modes.get(ours)) for ours, theirs in plan.items())


def _build(cfg: ModelConfig, arch: str, plan: dict, src: _Source, modes: dict) -> Transformer:
    """The model, its quantised layers built tensor by tensor and the rest assigned in fp32."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = weights_for_saving(model)
    plain = {}
    for ours, theirs in plan.items():
        shape = _shape(src, theirs)
        want = tuple(model.get_parameter(ours).shape) if ours == "lm_head.weight" else tuple(expected[ours].shape)
        if shape != want:
            raise LMForgeError(f"tensor {theirs[0]} has shape {src.shape(theirs[0])}, which disagrees with the "
                               f"file's metadata (lmforge's {ours} needs {want})")
        mode = modes.get(ours)
        module_name = ours.rpartition(".")[0]
        if _is_quantised_bias(ours, modes):
            continue  # built into its quantised layer
        if mode is None:
            plain[ours] = from_gguf_parts(cfg, arch, theirs, src.dequantized)
            continue
        four = mode == "int4" and ours != "wte.weight"  # an embedding table is looked up, not multiplied: int8
        parts = {t: (src.int4 if four else src.int8)(t) for t in theirs}
        q, *scales = [from_gguf_parts(cfg, arch, theirs, lambda t, i=i, p=parts: p[t][i])
                      for i in range(3 if four else 2)]
        del parts
        bias_name = module_name + ".bias"
        bias = from_gguf_parts(cfg, arch, plan[bias_name], src.dequantized) if bias_name in plan else None
        if ours == "wte.weight":
            layer = Int8Embedding(rows=(q, *scales))
        else:
            layer = Int4Linear(q, *scales, bias, GROUP) if four else Int8Linear(rows=(q, *scales), bias=bias)
        _replace(model, module_name, layer)
    model.load_state_dict(plain, strict=False, assign=True)
    model.finish_loading()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if left:
        raise LMForgeError(f"the GGUF file lacks weights for {left[0]}")
    return model


def _is_quantised_bias(name: str, modes: dict) -> bool:
    return name.endswith(".bias") and modes.get(name[:-len(".bias")] + ".weight") is not None


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_gguf(path: str | Path, quantize: str | None = "auto", dtype: str = "auto"
              ) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """(model, tokenizer, config.json contents) from a GGUF file. `quantize`: auto, none, int8 or
    int4 (see the module's docstring); unquantised weights are fp32, or `dtype` if one is named."""
    path = Path(path)
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise LMForgeError(f"unknown quantisation {quantize!r} (choose {', '.join(QUANTIZE)})")
    f, infos = _read(path)
    src = _Source(path, infos)
    try:
        freqs = src.dequantized("rope_freqs.weight").tolist() if "rope_freqs.weight" in infos else None
        cfg, arch = config_from_gguf(f, infos, freqs)
        tokenizer, stops = tokenizer_from_gguf(f)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise LMForgeError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                               f"{cfg.vocab_size} rows")
        plan = _plan(cfg, arch, infos)
        modes = _layer_modes(cfg, plan, infos, quantize)
        if cfg.tie_embeddings and modes["lm_head.weight"] is None:  # tied to the fp32 embedding, as in training
            del plan["lm_head.weight"], modes["lm_head.weight"]
        need, free = memory_needed(plan, src, modes), available_memory()
        if free is not None and need > free:
            raise LMForgeError(f"{path} needs about {need / 2**30:.1f} GiB of memory as loaded ({quantize}), and "
                               f"{free / 2**30:.1f} GiB is available" +
                               ("; try --quantize int4" if quantize in ("none", "int8") else ""))
        model = _build(cfg, arch, plan, src, modes)
    finally:
        src.close()
    if dtype not in ("auto", "float32"):
        for p in model.parameters():
            p.data = p.data.to(getattr(torch, dtype))
    meta = model_config_json(model, tokenizer, kind=Kind.CAUSAL_LM, created_by=f"lmforge import (gguf {arch})",
                             stop_token_ids=stops)
    return model.eval(), tokenizer, meta


def is_quantised(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (Int4Linear, Int8Linear, Int8Embedding)) for m in model.modules())


def import_gguf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a GGUF file into an lmforge model directory (fp32 weights; tokenizer rebuilt as tokenizer.json)."""
    model, tokenizer, meta = load_gguf(src, quantize="none")
    with staged_dir(out, overwrite) as tmp:
        atomic_write_json(tmp / "config.json", meta)
        tokenizer.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer.config)
        save_weights(weights_for_saving(model), tmp / "model.safetensors")
    return Path(out)
