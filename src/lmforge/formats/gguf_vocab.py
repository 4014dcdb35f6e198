"""Tokenizers in GGUF files, both ways: an lmforge (Hugging Face `tokenizers`) tokenizer as GGUF's
tokenizer.* keys for export, and back from them on import.

Byte-level BPE travels as GGUF's "gpt2" vocabulary: tokens, merges, token types, special ids and
the chat template, with the pre-tokenizer named by the identity llama.cpp knows: GPT-2's own
split -> "gpt-2"; GPT-4's split (lmforge's tokenizer, Llama 3) -> "llama-bpe"; the same with
single digits (Qwen2) -> "qwen2".

SentencePiece-style BPE (Llama 2, Mistral, TinyLlama: '▁' for spaces, <0xNN> byte fallback)
travels as GGUF's "llama" vocabulary: tokens, a score per token and token types, no merges.
llama.cpp merges the adjacent pair whose joined token scores highest; Hugging Face's BPE merges
the pair of lowest rank. So a token made by merge number r scores -(r + 1), and on the way back
the merges are rebuilt from the scores (every split of a token into two tokens, best score
first), which is how Hugging Face converts SentencePiece models too.
"""

from __future__ import annotations

import json
import re
import sys

from ..core.errors import LMForgeError
from ..text.tokenizer import SPLIT_PATTERN, Tokenizer

QWEN_SPLIT = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: numbers one digit at a time
PRE_PATTERNS = {"llama-bpe": SPLIT_PATTERN, "qwen2": QWEN_SPLIT}  # "gpt-2": ByteLevel's own regex
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
CHATML = ("{%- for message in messages -%}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


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


def leading_bos(tokenizer: Tokenizer) -> int | None:
    """The BOS id the tokenizer's post-processor puts before every text (Llama 2/3 style), or None."""
    probe = tokenizer.encode("a", add_special_tokens=True)
    return probe[0] if len(probe) > 1 and probe[0] in tokenizer.special_ids else None


def _space_prefix(tok: dict) -> bool | None:
    """For a SentencePiece-style tokenizer ('▁' for spaces, by a normalizer as Llama 2's or a
    Metaspace pre-tokenizer as Mistral's): whether a '▁' is put before the text (llama.cpp's
    add_space_prefix). None for any other layout."""
    norm, pre = tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    replace = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "
                  and n.get("content") == "▁" for n in steps)
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in steps)
    if replace and not pre:
        return prepend
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not steps:
        return pre.get("prepend_scheme", "always") != "never"
    return None


def tokenizer_metadata(tokenizer: Tokenizer, meta: dict, n_rows: int) -> dict:
    """GGUF's tokenizer.* keys for a byte-level or SentencePiece-style BPE tokenizer, the token list
    padded to the model's `n_rows` embedding rows with unused `[PAD{i}]` entries (llama.cpp wants
    one token per row)."""
    tok = json.loads(tokenizer.hf.to_str())
    model = tok.get("model") or {}
    space_prefix = _space_prefix(tok) if model.get("byte_fallback") else None
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") \
            or (tokenizer._byte_decoder is None and space_prefix is None):
        raise LMForgeError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen style) and "
                           "SentencePiece-style BPE with byte fallback (Llama 2, Mistral); this one is a "
                           f"{model.get('type')} tokenizer of neither layout")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(n_rows):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif space_prefix is not None and _BYTE_PIECE.fullmatch(piece):
            tokens.append(piece)
            types.append(BYTE)
        else:
            tokens.append(piece)
            types.append(UNKNOWN if piece == unk and space_prefix is not None else NORMAL if i not in added
                         else CONTROL if added[i]["special"] else USER_DEFINED)
    bos = leading_bos(tokenizer)
    stop = sorted({tokenizer.eot_id, *meta.get("stop_token_ids", [])})
    out = {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges,
           "bos": tokenizer.eot_id if bos is None else bos, "eos": tokenizer.eot_id, "pad": tokenizer.pad_id,
           "add_bos": bos is not None, "template": _chat_template(tokenizer, meta)}
    if space_prefix is None:
        out["pre"] = _pre_identity(tok)
    else:
        rank = {"".join(m.split(" ", 1)): r for r, m in reversed(list(enumerate(merges)))}
        out.update(model="llama", merges=None, add_space_prefix=space_prefix,
                   scores=[-float(rank[t] + 1) if t in rank else 0.0 for t in tokens],
                   unk=tokenizer.hf.token_to_id(unk) if unk else None)
    eot = [i for i in stop if i != tokenizer.eot_id]
    if eot:  # a chat model's end-of-turn marker (e.g. <|im_end|>): llama.cpp stops there too
        out["eot"] = eot[0]
    return out


def tokenizer_from_gguf(f: dict) -> tuple[Tokenizer, list[int]]:
    """An lmforge Tokenizer (as tokenizer.json + tokenizer_config.json would give) from GGUF's
    tokenizer.* keys, and the ids that end a generation."""
    from tokenizers import AddedToken, processors

    kind = f.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise LMForgeError(f"unsupported GGUF tokenizer model {kind!r} (lmforge reads byte-level BPE, 'gpt2', and "
                           "SentencePiece-style, 'llama')")
    pre = f.get("tokenizer.ggml.pre", "gpt-2") if kind == "gpt2" else "default"
    if kind == "gpt2" and pre != "gpt-2" and pre not in PRE_PATTERNS:
        raise LMForgeError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt-2, {', '.join(PRE_PATTERNS)})")
    tokens = f["tokenizer.ggml.tokens"]
    types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != UNUSED}
    hf = _sentencepiece_bpe(f, tokens, types, vocab) if kind == "llama" else _byte_level_bpe(f, pre, vocab)
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


def _sentencepiece_bpe(f: dict, tokens: list[str], types: list[int], vocab: dict[str, int]):
    """A Hugging Face BPE with byte fallback (Llama 2's tokenizer.json layout) from a "llama" GGUF
    vocabulary: merges rebuilt from the scores (see the module's docstring)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    pieces = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL}
    merges = []
    for t, i in pieces.items():
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in pieces and b in pieces:
                merges.append((-scores[i], pieces[a], pieces[b], a, b))
    merges.sort()
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and unk_id < len(tokens) else None
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                                byte_fallback=True, fuse_unk=True))
    prefix = f.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return hf


def _byte_level_bpe(f: dict, pre: str, vocab: dict[str, int]):
    """A Hugging Face byte-level BPE from a "gpt2" GGUF vocabulary and its pre-tokenizer identity."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    if pre == "gpt-2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    return hf
