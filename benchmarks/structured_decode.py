"""What a JSON schema costs in decoding: engine tokens/s constrained vs unconstrained, batch 1 and 16.

Builds a random model (GPT-2 layout, 4 layers, width 256, context 512) over a 50k-token byte-level
BPE tokenizer trained here on generated text (no downloads; `grammar_libs.corpus`), loads it the way
`lmforge serve` does, and runs the engine on B prompts of `--max-tokens` new tokens each at
temperature 1, with and without a JSON schema (an object holding an array of at least 64 strings,
short or free, so constrained rows run to max_tokens like unconstrained ones). Rounds alternate the two;
medians are reported, with the time spent computing masks per token generated.

    python benchmarks/structured_decode.py [--vocab 50000] [--batches 1,16] [--max-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grammar_libs import corpus  # noqa: E402

from lmforge import load  # noqa: E402
from lmforge.core.runtime import cpu_name  # noqa: E402
from lmforge.formats.modeldir import save_model_dir  # noqa: E402
from lmforge.inference import engine as engine_module  # noqa: E402
from lmforge.inference.engine import Engine, Request  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.models.transformer import Transformer  # noqa: E402
from lmforge.text.tokenizer import Tokenizer  # noqa: E402

# Arrays that must hold 64 strings, so no row can finish before max_tokens (a row that ends early would
# flatter the constrained side). Short strings put structure every few tokens and make each mask check
# every token's length (the costly case); free strings are mostly string content (the common case).
SCHEMAS = {f"{name} strings": {"type": "object", "properties": {"notes": {"type": "array", "minItems": 64,
                                                                          "items": {"type": "string", **extra}}},
                               "required": ["notes"]}
           for name, extra in (("short", {"maxLength": 24}), ("free", {}))}
MASK = {"seconds": 0.0}


def timed_masks():
    """Wrap the engine's mask call to count the time it takes (in the engine's mask thread, which runs
    beside the model's forward pass, so this is not all added to the step)."""
    inner = engine_module.forbidden_tokens

    def wrapper(matchers, vocab):
        start = time.perf_counter()
        out = inner(matchers, vocab)
        MASK["seconds"] += time.perf_counter() - start
        return out

    engine_module.forbidden_tokens = wrapper


def build(directory: Path, vocab: int) -> None:
    start = time.perf_counter()
    tokenizer = Tokenizer.train(list(corpus()), vocab_size=vocab, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=512, n_layer=4, n_head=4, n_embd=256)
    save_model_dir(directory, Transformer(cfg).eval(), tokenizer)
    print(f"model: vocab {tokenizer.vocab_size}, 4 layers x 256 (built in {time.perf_counter() - start:.0f} s)",
          file=sys.stderr)


def run(lm, batch: int, max_tokens: int, grammar) -> tuple[float, int]:
    """Tokens/s of one batch run, and the tokens generated."""
    prompts = [lm.tokenizer.encode(f"Report {i}: ") for i in range(batch)]
    engine = Engine(lm.model, slots=batch, max_len=max(len(p) for p in prompts) + max_tokens)
    requests = [Request(p, max_tokens=max_tokens, temperature=1.0, seed=i, grammar=grammar, stop={lm.tokenizer.eot_id})
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    samples = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(s[0].tokens) for s in samples)
    return tokens / seconds, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    timed_masks()
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "model", a.vocab)
        lm = load(Path(tmp) / "model", device="cpu")
        rows = []
        for (label, schema), batch in ((s, int(b)) for s in SCHEMAS.items() for b in a.batches.split(",")):
            start = time.perf_counter()
            grammar = lm.grammar(json_schema=schema)
            print(f"{label}: compiled in {1000 * (time.perf_counter() - start):.1f} ms (the first with the "
                  "tokenizer bridge)", file=sys.stderr)
            run(lm, 2, 8, grammar)  # warm-up: first-use costs (lazy lexer states, allocations) stay out
            free, ruled, masks = [], [], []
            for _ in range(a.rounds):
                free.append(run(lm, batch, a.max_tokens, None)[0])
                MASK["seconds"] = 0.0
                tps, tokens = run(lm, batch, a.max_tokens, grammar)
                ruled.append(tps)
                masks.append(1e6 * MASK["seconds"] / max(tokens, 1))
            f, r = statistics.median(free), statistics.median(ruled)
            rows.append((label, batch, f, r, r / f, statistics.median(masks)))
    print(f"\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {a.vocab}, "
          f"{a.max_tokens} new tokens per row, median of {a.rounds}\n")
    print("| schema | batch | unconstrained tok/s | JSON schema tok/s | ratio | mask µs per token |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, batch, f, r, ratio, per_token in rows:
        print(f"| {label} | {batch} | {f:,.0f} | {r:,.0f} | {ratio:.2f} | {per_token:.0f} |")


if __name__ == "__main__":
    main()
