"""Grammar-constrained decoding: token-mask time per token, llguidance vs xgrammar, on CPU.

For each vocabulary size, trains a byte-level BPE tokenizer (`tokenizers`, fixed-seed generated text: syllable
words plus JSON-like lines; specials `<|endoftext|>` (EOS), `<|pad|>`, `<|im_start|>`, `<|im_end|>`), compiles one
JSON Schema (object with a string, an integer, an enum and an array of numbers, all required) in both libraries,
then walks a fixed valid instance token by token: before each token (and once more before EOS) it computes the
next-token bitmask, timing only that call. Reported per library and vocab: tokenizer setup (llguidance:
`LLTokenizer` from the tokenizer.json string; xgrammar: `PreTrainedTokenizerFast` + `TokenizerInfo.from_huggingface`),
compile (schema -> matcher), mean/p50/p99 mask time over all passes, the mean of the first pass alone (llguidance
builds lexer state lazily, xgrammar up front), and xgrammar/llguidance ratios. Sanity: both must accept every
token and EOS at the end; the number of steps with identical masks is printed. Nothing is downloaded.

xgrammar must not enter the venv (it pulls transformers and triton); install it aside and point PYTHONPATH at it:

    .venv/bin/pip install --target /tmp/xgt --no-deps xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/xgt .venv/bin/python benchmarks/grammar_libs.py [--vocabs 4000,50000,150000] [--repeat 5]

Without xgrammar importable, only the llguidance rows are printed, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import llguidance
import llguidance.torch as llg_torch
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

try:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    XGR_ERROR = ""
except Exception as e:  # any import failure means "skip xgrammar"
    xgr, XGR_ERROR = None, f"{type(e).__name__}: {e}"

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "color", "scores"],
    "additionalProperties": False,
}
INSTANCE = (
    '{"name": "Katomi Belurasa of the northern valley, said: \\"hello\\" twice", "age": 42, "color": "green", '
    '"scores": [1.5, -2.25, 3e-4, 1024, 0.125, 77.0]}'
)
N_LEXICON = 400_000


def corpus(seed: int = 0) -> Iterator[str]:
    """Fixed-seed text: a syllable lexicon (varied enough to reach 150k merges) plus JSON-like lines."""
    rng = random.Random(seed)
    syll = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    lex: set[str] = set()
    while len(lex) < N_LEXICON:
        w = "".join(rng.choice(syll) for _ in range(rng.randint(1, 6)))
        lex.add(w.capitalize() if rng.random() < 0.1 else w)
    words = sorted(lex)
    for i in range(0, len(words), 1000):
        yield " ".join(words[i : i + 1000])
    for _ in range(20_000):
        obj = {
            rng.choice(words[:5000]): rng.choice(
                [rng.randint(-999, 99999), round(rng.uniform(-9, 9), 3), " ".join(rng.sample(words, 3)), [1, 2.5]]
            )
            for _ in range(3)
        }
        yield json.dumps(obj)


def train_tokenizer(vocab: int, path: str) -> str:
    """Train a byte-level BPE tokenizer to `vocab` entries, save it to `path`, return its JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.save(path)
    with open(path) as f:
        return f.read()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def walk(
    fill: Callable[[], None],
    mask: torch.Tensor,
    consume: Callable[[int], bool],
    ids: list[int],
    eos: int,
    keep: list[np.ndarray] | None,
) -> list[float]:
    """Mask before each token and before EOS (timed), check the token is allowed, consume it; return µs per mask."""
    out = []
    for t in [*ids, eos]:
        t0 = time.perf_counter_ns()
        fill()
        out.append((time.perf_counter_ns() - t0) / 1e3)
        bits = mask[0].numpy().view(np.uint32)
        if keep is not None:
            keep.append(bits.copy())
        if not (bits[t // 32] >> (t % 32)) & 1:
            raise RuntimeError(f"token {t} not in mask at step {len(out) - 1}")
        if not consume(t):
            raise RuntimeError(f"token {t} rejected at step {len(out) - 1}")
    return out


def bench_llguidance(
    tok_json: str, n_vocab: int, eos: int, ids: list[int], repeat: int, keep: list[np.ndarray]
) -> dict[str, Any]:
    lltok, t_tok = timed(lambda: llguidance.LLTokenizer(tok_json, n_vocab=n_vocab, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    m, t_comp = timed(lambda: llguidance.LLMatcher(lltok, grammar))
    if m.is_error():
        raise RuntimeError(m.get_error())
    mask = llg_torch.allocate_token_bitmask(1, n_vocab)
    passes = []
    for r in range(repeat):
        m.reset()
        passes.append(
            walk(
                lambda: llg_torch.fill_next_token_bitmask(m, mask),
                mask,
                m.consume_token,
                ids,
                eos,
                keep if r == 0 else None,
            )
        )
    return {"tok": t_tok, "compile": t_comp, "passes": passes}


def bench_xgrammar(
    path: str, n_vocab: int, eos: int, ids: list[int], repeat: int, keep: list[np.ndarray]
) -> dict[str, Any]:
    def setup() -> Any:
        hf = PreTrainedTokenizerFast(tokenizer_file=path, eos_token=SPECIALS[0], additional_special_tokens=SPECIALS[1:])
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=n_vocab, stop_token_ids=[eos])

    info, t_tok = timed(setup)

    def compile_() -> Any:
        compiled = xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1).compile_json_schema(json.dumps(SCHEMA))
        return xgr.GrammarMatcher(compiled)

    m, t_comp = timed(compile_)
    mask = xgr.allocate_token_bitmask(1, n_vocab)
    passes = []
    for r in range(repeat):
        m.reset()
        passes.append(
            walk(lambda: m.fill_next_token_bitmask(mask), mask, m.accept_token, ids, eos, keep if r == 0 else None)
        )
    return {"tok": t_tok, "compile": t_comp, "passes": passes, "vocab_type": str(info.vocab_type)}


def stats(res: dict[str, Any]) -> dict[str, float]:
    allm = np.concatenate([np.asarray(p) for p in res["passes"]])
    return {
        "mean": float(allm.mean()),
        "p50": float(np.percentile(allm, 50)),
        "p99": float(np.percentile(allm, 99)),
        "first": float(np.mean(res["passes"][0])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocabs", default="4000,50000,150000")
    ap.add_argument("--repeat", type=int, default=5, help="passes over the instance per library and vocab")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"llguidance {llguidance.__version__}, xgrammar {version('xgrammar') if xgr else '-'}, "
        f"{os.cpu_count()} CPUs, repeat {args.repeat}\n"
    )
    if xgr is None:
        print(f"xgrammar not importable ({XGR_ERROR}); llguidance rows only\n")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for target in (int(v) for v in args.vocabs.split(",")):
            path = os.path.join(tmp, f"tok{target}", "tokenizer.json")
            os.makedirs(os.path.dirname(path))
            tok_json, t_train = timed(lambda target=target, path=path: train_tokenizer(target, path))
            tok = Tokenizer.from_str(tok_json)
            n_vocab, eos = tok.get_vocab_size(), tok.token_to_id(SPECIALS[0])
            ids = tok.encode(INSTANCE).ids
            assert tok.decode(ids) == INSTANCE
            notes.append(
                f"vocab {n_vocab}: BPE training {t_train:.1f} s, instance = {len(ids)} tokens "
                f"({len(ids) + 1} masks per pass incl. EOS)"
            )
            keep_l: list[np.ndarray] = []
            res = {"llguidance": bench_llguidance(tok_json, n_vocab, eos, ids, args.repeat, keep_l)}
            if xgr is not None:
                keep_x: list[np.ndarray] = []
                res["xgrammar"] = bench_xgrammar(path, n_vocab, eos, ids, args.repeat, keep_x)
                same = sum(bool(np.array_equal(a, b)) for a, b in zip(keep_l, keep_x))
                sup = all(not (a & ~b).any() for a, b in zip(keep_l, keep_x))
                notes.append(
                    f"vocab {n_vocab}: both accepted all {len(ids)} tokens + EOS; identical masks at {same}/"
                    f"{len(keep_l)} steps, xgrammar mask a superset of llguidance's at every step: {sup}"
                )
            st = {k: stats(v) for k, v in res.items()}
            for lib, r in res.items():
                s, base = st[lib], st["llguidance"]
                ratio = f"{s['mean'] / base['mean']:.2f} / {s['p99'] / base['p99']:.2f}" if lib != "llguidance" else ""
                rows.append(
                    f"| {n_vocab} | {lib} | {r['tok'] * 1e3:.0f} | {r['compile'] * 1e3:.1f} | {s['mean']:.1f} "
                    f"| {s['p50']:.1f} | {s['p99']:.1f} | {s['first']:.1f} | {ratio} |"
                )
    print(
        "| vocab | library | tok setup ms | compile ms | mask mean µs | p50 µs | p99 µs | 1st-pass mean µs "
        "| xgr/llg mean / p99 |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
