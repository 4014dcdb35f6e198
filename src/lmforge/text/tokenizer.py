"""Byte-level BPE, trained with Hugging Face `tokenizers` or loaded from any `tokenizer.json`."""

from __future__ import annotations

import json
import math
import sys
import threading
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..core.errors import LMForgeError
from ..core.fileio import atomic_write

EOT = "<|endoftext|>"
# Reserved up front so chat and tool-use fine-tuning never needs to resize the embeddings.
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|im_start|>", "<|im_end|>", "<|tool_call|>", "<|/tool_call|>",
                  "<|tool_result|>", "<|/tool_result|>", "<|mask|>"]
SPECIAL_TOKENS += [f"<|reserved_{i}|>" for i in range(16 - len(SPECIAL_TOKENS))]
SENTINELS = 100  # T5's span-corruption sentinels, added for `pretrain --objective span`
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte and every special token: the smallest vocabulary to train
# End-of-text markers used by common open tokenizers, in order of preference.
_EOT_CANDIDATES = [EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]"]
# GPT-4's split pattern: words, numbers in groups of up to 3 digits, punctuation, whitespace runs.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def auto_vocab_size(num_bytes: int) -> int:
    """A vocabulary that suits the corpus: about one token type per 500 bytes, a power of two.

    Small corpora cannot support many merges, and small models pay dearly for a big output
    layer; 1-2 MB of text gets 4096.
    """
    target = max(num_bytes / 500, 1)
    return int(min(32768, max(512, 2 ** round(math.log2(target)))))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by ByteLevel BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_PLAIN_LOCK = threading.Lock()  # module-level: a lock in the instance would stop copy.deepcopy


def show_bytes(data: bytes) -> str:
    """UTF-8 text, with each byte that is not part of a whole character shown as `<0xC3>`."""
    out = []
    while data:
        try:
            out.append(data.decode())
            break
        except UnicodeDecodeError as e:
            out.append(data[:e.start].decode())
            out += [f"<0x{b:02X}>" for b in data[e.start:e.end]]
            data = data[e.end:]
    return "".join(out)


def printable(text: str) -> str:
    """`text` safe to print on one line of a table: control characters (newlines, tabs, ...) escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the few things lmforge needs on top."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None) -> None:
        # Some shipped tokenizer.json files switch on truncation/padding (MiniLM: 128 tokens);
        # lmforge decides lengths itself.
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = False
        self.hf = tok  # parses special-token strings; treat as read-only once encoding has begun
        self.config = config or {}  # tokenizer_config.json, when loaded from a Hugging Face directory
        self._plain: HFTokenizer | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def train(cls, documents: list[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:  # BPE stops when no pair is seen twice: a small corpus caps the merges
            print(f"warning: asked for {vocab_size:,} tokens, but the corpus supports only {got:,} "
                  "(too little text for more merges)", file=sys.stderr)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or a directory holding it (plus `tokenizer_config.json`)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise LMForgeError(f"no tokenizer.json at {path}")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise LMForgeError(f"cannot read tokenizer {file}: {str(e).splitlines()[0]}") from None
        config = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.exists():
            config = json.loads(cfg_file.read_text())
        return cls(tok, config)

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.hf.to_str(pretty=True))

    def to_str(self) -> str:
        return self.hf.to_str()

    # -- use -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. With `special=False`, special-token strings count as plain text.
        `add_special_tokens` applies the tokenizer's post-processor (e.g. Llama's leading BOS)."""
        return self._encode([text], special, add_special_tokens)[0]

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads). Special-token strings are plain text by
        default here: a document that mentions `<|endoftext|>` must not end early."""
        return self._encode(texts, special)

    def encode_with_specials(self, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
        """Encoder inputs: each text with the tokenizer's own specials ([CLS] ... [SEP]), cut to
        `max_len` while keeping the closing token. Returns (ids, how many texts were cut)."""
        seqs = self._encode(texts, True, add_special_tokens=True)
        cut = sum(len(s) > max_len for s in seqs)
        return [s if len(s) <= max_len else s[:max_len - 1] + s[-1:] for s in seqs], cut

    def _encode(self, texts: list[str], special: bool, add_special_tokens: bool = False) -> list[list[int]]:
        tok = self.hf if special else self._plain_tokenizer()
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def __getstate__(self) -> dict:
        # Pickling a Rust tokenizer drops `encode_special_tokens`: let a copy rebuild its plain twin.
        return {**self.__dict__, "_plain": None}

    def _plain_tokenizer(self) -> HFTokenizer:
        """A second copy that reads special-token strings as plain text. `encode_special_tokens`
        is a setting of the shared Rust object, so flipping it per call would race between
        threads (a server encodes from several); two fixed copies never change state."""
        if self._plain is None:
            with _PLAIN_LOCK:
                if self._plain is None:
                    plain = HFTokenizer.from_str(self.hf.to_str())
                    plain.no_truncation()
                    plain.no_padding()
                    plain.encode_special_tokens = True
                    self._plain = plain
        return self._plain

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def piece(self, i: int) -> str:
        """Token `i` as a reader should see it: its own text when that is whole UTF-8, else its bytes
        as `<0xC3>` escapes (a byte-level BPE token often holds half a character, which decoding
        alone would show as `\ufffd`). Whitespace and control characters are left as they are."""
        raw = self.id_to_token(i)
        if raw is None:
            raise LMForgeError(f"token id {i} is outside the vocabulary ({self.vocab_size} tokens)")
        if i in self.special_ids:
            return raw
        inverse = self._byte_decoder
        if inverse is not None and all(c in inverse for c in raw):
            return show_bytes(bytes(inverse[c] for c in raw))
        text = self.decode([i])
        if "\ufffd" in text and raw.startswith("<0x") and raw.endswith(">"):  # SentencePiece byte fallback
            return raw
        return text

    def raw_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (a byte-level token may hold part of a character)."""
        raw, inverse = self.id_to_token(i), self._byte_decoder
        if raw is not None and i not in self.special_ids and inverse is not None and all(c in inverse for c in raw):
            return bytes(inverse[c] for c in raw)
        return self.decode([i]).encode()

    @cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """Character -> byte for byte-level BPE (GPT-2's map), None for other tokenizers."""
        decoder = json.loads(self.hf.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        if not any(d.get("type") == "ByteLevel" for d in parts):
            return None
        return {c: b for b, c in _bytes_to_unicode().items()}

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def with_sentinels(self, n: int = SENTINELS) -> Tokenizer:
        """A copy with T5's span-corruption sentinels `<extra_id_0>` .. `<extra_id_{n-1}>` added as
        special tokens (unless it has them), at the end of the vocabulary in T5's order: `<extra_id_0>`
        the last id. lmforge's own tokenizers have none; T5's do."""
        if self.sentinel_ids():
            return self
        tok = HFTokenizer.from_str(self.hf.to_str())
        tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
                                for i in reversed(range(n))])
        return Tokenizer(tok, self.config)

    def sentinel_ids(self) -> list[int]:
        """The ids of `<extra_id_0>`, `<extra_id_1>`, ... for as many as the tokenizer has."""
        ids = []
        while (i := self.token_id(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(i)
        return ids

    def special_tokens(self) -> list[str]:
        """The special tokens' strings (e.g. <|im_end|>)."""
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]

    @cached_property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def _configured(self, key: str, candidates: list[str]) -> int | None:
        for name in [self.config.get(key)] + candidates:
            if isinstance(name, dict):  # tokenizer_config.json sometimes stores an AddedToken dict
                name = name.get("content")
            if name and self.token_id(name) is not None:
                return self.token_id(name)
        return None

    @cached_property
    def pad_id(self) -> int:
        """Padding token (padded positions are masked or ignored, so any valid id would do)."""
        found = self._configured("pad_token", ["<|pad|>", "[PAD]", "<pad>"])
        return self.eot_id if found is None else found

    @cached_property
    def mask_token(self) -> str | None:
        """The masked-language-model mask token, if the tokenizer has one."""
        found = self._configured("mask_token", ["[MASK]", "<mask>", "<|mask|>"])
        return None if found is None else self.id_to_token(found)

    @cached_property
    def eot_id(self) -> int:
        """The end-of-text token that separates documents."""
        found = self._configured("eos_token", _EOT_CANDIDATES)
        if found is not None:
            return found
        raise LMForgeError("the tokenizer has no end-of-text token (looked for "
                           + ", ".join(_EOT_CANDIDATES) + ")")

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token (0 for special tokens): for bits-per-byte."""
        n = self.vocab_size
        lengths = [0] * n
        inverse = self._byte_decoder
        byte_level = inverse is not None
        special = self.special_ids
        for i in range(n):
            if i in special:
                continue
            piece = self.id_to_token(i)
            if piece is None:
                continue
            if byte_level and all(c in inverse for c in piece):
                lengths[i] = len(piece)  # one character per byte
            else:
                lengths[i] = len(self.decode([i]).encode())
        return lengths
