"""Hugging Face checkpoint directories in and out: `lmforge import`, `lmforge export`, and
`lmforge.load(hf_dir)`.

Reading streams tensors from (sharded) safetensors one at a time into a model built on the meta
device, so peak memory stays close to the size of the weights. Writing produces a directory
that `transformers`' `AutoModelForCausalLM`/`AutoTokenizer.from_pretrained` load unchanged.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path, atomic_write_json, staged_dir
from ..core.tensorfile import TensorFile
from ..models.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .hf import SUPPORTED, adapt_to_weights, config_from_hf, config_to_hf, export_family, weights_from_hf, weights_to_hf
from .hf_seq2seq import t5_head_scaled
from .kinds import Kind, is_adapter, kind_of
from .modeldir import (
    build_model,
    check_vocab,
    load_model_dir,
    model_config_json,
    read_config,
    stop_token_ids,
    weights_for_saving,
)

# Files copied along with the weights: they carry the chat template, special tokens and
# generation defaults that `transformers` (and lmforge's chat) read back.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab.txt")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def is_hf_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return "lmforge_format" not in data and "model_type" in data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}: invalid JSON ({e.msg})") from None


class Shards:
    """The tensors of a checkpoint directory, over one or many safetensors files (with the index)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (directory / f).exists():
                    raise LMForgeError(f"missing shard {f} (listed in {index.name})")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                pickles = list(directory.glob("*.bin")) + list(directory.glob("*.pt"))
                extra = " (only pickle .bin/.pt files, which lmforge never loads: convert them to safetensors)" \
                    if pickles else ""
                raise LMForgeError(f"no weights (*.safetensors) in {directory}{extra}")
            weight_map = None
        self.where: dict[str, TensorFile] = {}
        for f in files:
            tf = TensorFile(directory / f)
            for name in tf.names:
                if weight_map is None or weight_map.get(name) == f:
                    self.where[name] = tf
        self.names = set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name].dtype(name)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.where[name].read(name, out)


def load_hf(directory: str | Path, dtype: str = "auto") -> tuple[Transformer, Tokenizer, dict]:
    """(model, tokenizer, lmforge config.json) for a Hugging Face checkpoint directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise LMForgeError(f"{directory} has no config.json")
    hf_cfg = _read_json(directory / "config.json")
    family = hf_cfg.get("model_type")
    if family not in SUPPORTED:
        raise LMForgeError(f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED)}")
    cfg = config_from_hf(hf_cfg)
    if dtype not in DTYPES:
        raise LMForgeError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    tokenizer = tokenizer_for(directory)
    check_vocab(tokenizer, cfg, str(directory))
    shards = Shards(directory)
    cfg, kind = adapt_to_weights(cfg, family, shards.names)
    tensors = dict(weights_from_hf(cfg, family, shards, DTYPES[dtype]))
    model = build_model(cfg, tensors, f"weights in {directory}")
    gen = _read_json(directory / "generation_config.json") if (directory / "generation_config.json").exists() else {}
    eos = gen.get("eos_token_id", hf_cfg.get("eos_token_id"))
    stop = [eos] if isinstance(eos, int) else list(eos or [])
    meta = model_config_json(model, tokenizer, kind=kind, created_by=f"lmforge import ({family})",
                             stop_token_ids=[i for i in stop if i is not None and i < tokenizer.vocab_size])
    st = directory / "sentence_bert_config.json"  # a sentence-transformers model: its sequence limit
    if st.exists():
        meta["max_seq_length"] = _read_json(st).get("max_seq_length")
    return model.eval(), tokenizer, meta


def tokenizer_for(directory: Path) -> Tokenizer:
    """tokenizer.json, or for older BERT checkpoints a WordPiece tokenizer built from vocab.txt."""
    if (directory / "tokenizer.json").exists() or not (directory / "vocab.txt").exists():
        return Tokenizer.from_file(directory)
    from tokenizers.implementations import BertWordPieceTokenizer

    cfg = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    wp = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=cfg.get("do_lower_case", True))
    return Tokenizer(wp._tokenizer, cfg)


def import_hf(src: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Convert a Hugging Face checkpoint into an lmforge model directory."""
    src, out = Path(src), Path(out)
    model, tokenizer, meta = load_hf(src, dtype)
    with staged_dir(out, overwrite) as tmp:
        atomic_write_json(tmp / "config.json", meta)
        tokenizer.save(tmp / "tokenizer.json")
        with atomic_path(tmp / "model.safetensors") as f:
            save_file(weights_for_saving(model), str(f))
        copy_side_files(src, tmp)
    return out


def _tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict:
    eot = tokenizer.id_to_token(tokenizer.eot_id)
    pad = "<|pad|>" if tokenizer.token_id("<|pad|>") is not None else eot
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot, "pad_token": pad,
           "unk_token": None, "model_max_length": context_length, "clean_up_tokenization_spaces": False,
           "add_bos_token": False, "add_eos_token": False}
    template = tokenizer.config.get("chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def export_hf(model_dir: str | Path, out: str | Path, shard_size_mb: float = 2000.0, overwrite: bool = False,
              dtype: str = "auto") -> Path:
    """Write an lmforge model directory as a Hugging Face checkpoint (sharded if large)."""
    model_dir, out = Path(model_dir), Path(out)
    meta = read_config(model_dir)
    if not kind_of(meta).generates and kind_of(meta) is not Kind.SEQ2SEQ:
        raise LMForgeError("only language models and encoder-decoders can be exported to Hugging Face format "
                           f"(this is {kind_of(meta).phrase})")
    if is_adapter(meta):
        raise LMForgeError(f"{model_dir} is a LoRA adapter: merge it first (lmforge merge-lora {model_dir} --out DIR)")
    model, tokenizer, meta = load_model_dir(model_dir)
    cfg = model.cfg
    family = export_family(cfg)
    to = DTYPES.get(dtype, "bad")
    if to == "bad":
        raise LMForgeError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    sd = model.state_dict()
    tensors = weights_to_hf(cfg, family, sd)
    if family == "t5" and cfg.tie_embeddings and not t5_head_scaled(cfg):
        # transformers ties T5's output layer only together with the d_model^-0.5 scale: a tied head
        # without it goes out as an untied copy (tie_word_embeddings false)
        tensors["lm_head.weight"] = tensors["shared.weight"].clone()
    if to is not None:
        tensors = {k: v.to(to) for k, v in tensors.items()}
    hf_cfg = config_to_hf(cfg, family, bos_id=tokenizer.eot_id, eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with staged_dir(out, overwrite) as tmp:
        _write_shards(tensors, tmp, int(shard_size_mb * 1e6))
        atomic_write_json(tmp / "config.json", hf_cfg)
        tokenizer.save(tmp / "tokenizer.json")
        copy_side_files(model_dir, tmp)  # an imported model keeps its own; a trained one gets fresh ones
        if not (tmp / "tokenizer_config.json").exists():
            atomic_write_json(tmp / "tokenizer_config.json", _tokenizer_config(tokenizer, cfg.context_length))
        if not (tmp / "generation_config.json").exists():
            stop = sorted(stop_token_ids(tokenizer, meta))
            atomic_write_json(tmp / "generation_config.json", {
                "bos_token_id": tokenizer.eot_id, "eos_token_id": stop[0] if len(stop) == 1 else stop,
                "pad_token_id": tokenizer.token_id("<|pad|>"),
                **({"decoder_start_token_id": cfg.decoder_start_token_id} if cfg.is_encoder_decoder else {})})
    print(f"exported {model_dir} as a Hugging Face {family} checkpoint to {out}", file=sys.stderr)
    return out


def copy_side_files(src: Path, dest: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).exists() and not (dest / name).exists():
            shutil.copyfile(src / name, dest / name)


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        with atomic_path(directory / "model.safetensors") as f:
            save_file(shards[0], str(f), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(directory / fname) as f:
            save_file(shard, str(f), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
