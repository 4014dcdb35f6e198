"""Grammar-constrained decoding: per-request token masks from a JSON Schema, a regex or a Lark grammar.

llguidance compiles the grammar and computes, before each token, which tokens may come next; the
engine keeps one matcher per sample and sets every other logit to -inf inside its batched step. We
chose llguidance over xgrammar (BENCHMARKS.md, "Grammar libraries"): it reads any `tokenizer.json`
directly (lmforge's BPE, GPT-2, Llama 3, Qwen, SentencePiece-style), has no runtime dependency on
transformers, and its masks cost tens of microseconds per token on a CPU at a 150k vocabulary.

Untrusted grammars are bounded: by size before compiling, by llguidance's parser fuel while
compiling and masking, and by wall-clock time for the compile. Compiled grammars are cached (a
fresh matcher is a cheap copy of the cached one).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from ..core.errors import LMForgeError
from ..text.tokenizer import Tokenizer
from ..text.toolcalls import JSON_LAYOUT

MAX_GRAMMAR_BYTES = 64_000  # a schema or grammar's text (OpenAI caps a strict schema's size too)
MAX_COMPILE_S = 5.0  # past this, a schema is refused rather than stalling the server
CACHE_SIZE = 64


class GrammarError(LMForgeError):
    """A grammar that cannot be compiled or enforced; the message names what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency; a broken install gets one clear line
        raise LMForgeError(f"constrained decoding needs the llguidance package ({e})") from None
    return llguidance


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@lru_cache(maxsize=8)
def _bridge(tokenizer_json: str, vocab: int, eos: tuple[int, ...]):
    """llguidance's view of a tokenizer (~10-300 ms to build, so built once per tokenizer).

    SentencePiece-style byte-fallback tokens (<0x22> is the byte '"') must reach llguidance as vocabulary
    entries: where a tokenizer.json also lists them among its added tokens (some conversions do), it
    reads them as added tokens, not as the bytes they stand for, and the mask and the parser disagree."""
    data = json.loads(tokenizer_json)
    if data.get("model", {}).get("byte_fallback"):
        added = data.get("added_tokens") or []
        data["added_tokens"] = [t for t in added if not _BYTE_TOKEN.match(t.get("content", ""))]
        tokenizer_json = json.dumps(data)
    try:
        return _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=list(eos))
    except ValueError as e:  # e.g. T5's Unigram tokenizer with a bare Metaspace decoder
        raise LMForgeError(f"the grammar library cannot read this tokenizer ({e}); JSON schemas, regexes and "
                           "tool calls need a byte-level BPE or byte-fallback tokenizer") from None


def _limits():
    # Defaults are generous; tighter fuel bounds what one adversarial grammar can cost per token.
    return _llguidance().LLParserLimits(step_lexer_fuel=200_000, step_max_items=50_000, max_grammar_size=200_000)


def json_schema_grammar(schema: object) -> str:
    """llguidance's grammar for JSON that validates against `schema`, laid out as `JSON_LAYOUT` says."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    text = json.dumps(schema)
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the schema is {len(text)} bytes; the limit is {MAX_GRAMMAR_BYTES}")
    # overrides, not defaults: a schema's own x-guidance cannot undo the layout
    return _llguidance().LLMatcher.grammar_from_json_schema(text, overrides=JSON_LAYOUT)


def regex_grammar(pattern: str) -> str:
    if len(pattern) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the regex is {len(pattern)} characters; the limit is {MAX_GRAMMAR_BYTES}")
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark: str) -> str:
    if len(lark) > MAX_GRAMMAR_BYTES * 2:
        raise GrammarError(f"the grammar is {len(lark)} characters; the limit is {MAX_GRAMMAR_BYTES * 2}")
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class Grammar:
    """A compiled grammar for one tokenizer; `matcher()` gives a fresh per-sample state."""

    def __init__(self, bridge, grammar: str) -> None:
        llg = _llguidance()
        start = time.perf_counter()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, bridge, limits=_limits())
        if is_error:
            raise GrammarError(_first_line(messages[0]))
        self._root = llg.LLMatcher(bridge, grammar, log_level=0, limits=_limits())
        if self._root.is_error():
            raise GrammarError(_first_line(self._root.get_error()))
        if time.perf_counter() - start > MAX_COMPILE_S:
            raise GrammarError(f"the grammar took over {MAX_COMPILE_S:g} s to compile; simplify it")

    def matcher(self):
        return self._root.deep_copy()


class Compiler:
    """Compiles grammars for one tokenizer and vocabulary, with an LRU cache keyed by grammar text.

    `eos` are the ids a finished grammar allows (the model's end of text / end of turn)."""

    def __init__(self, tokenizer: Tokenizer, vocab: int, eos: list[int]) -> None:
        self._bridge = _bridge(tokenizer.hf.to_str(), vocab, tuple(sorted(set(eos))))
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: str) -> Grammar:
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
        compiled = Grammar(self._bridge, grammar)  # outside the lock: llguidance releases the GIL here
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def _first_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines and lines[0].startswith("regex parse error") else (lines[0] if lines else "")
    return re.sub(r"\s+", " ", text)[:300] or "the grammar is invalid"


# -- masks, inside the engine's batched step --------------------------------------------------------------


def forbidden_tokens(matchers: list, vocab: int) -> torch.Tensor:
    """[len(matchers), vocab] bool: which tokens each matcher forbids next. One llguidance call fills
    every row's bitmask (in parallel, without the GIL); numpy unpacks the bits in one pass."""
    words = (vocab + 31) // 32
    bits = torch.full((len(matchers), words), -1, dtype=torch.int32)
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
    else:
        _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(), words * 4,
                                            len(matchers))
    # little-endian words, so bit i of the row's bytes (low bit first) is token i
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
    return torch.from_numpy(allowed).view(torch.bool).logical_not_()


@lru_cache(maxsize=1)
def _executor():
    return _llguidance().LLExecutor()
