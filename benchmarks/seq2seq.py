"""Encoder-decoder against decoder-only on the dates task: same parameters, same training time.

The dates data of `examples/make_data.py dates` (`lmforge.data.synthetic.date_records`: 20,000
training pairs such as "5th of March 2021" -> "2021-03-05", 1,000 held-out test dates) and one
byte-level BPE tokenizer trained here on both sides of the training pairs, used by both models:

  encoder-decoder  `pretrain --objective seq2seq --arch t5 --size d3` (3 + 3 blocks, 192 wide;
                   sources and targets of at most --context-length 32 tokens each), batch 64
  decoder-only     `pretrain --objective clm --arch llama` (or --decoder-arch gpt2) on the same pairs
                   as one document each, "<input> => <target>" (pretrain packs documents, each
                   followed by end-of-text: the model learns to stop after the target); depth and
                   width chosen so its parameter count is within 5% of the T5's (the T5's width when
                   one fits); context 2 x 32 (a source and its target); batch sized to read about as
                   many pairs per step as the T5 (its windows hold several documents)

Both train for --minutes of wall clock each (one after the other, same threads: --threads, default
1), with the library's defaults (Muon, WSD, the width's learning rate) and no evaluation until the
budget is spent. Then, on the test pairs, greedy decoding through the engine (slots = --batch-size):
the T5 through `lmforge.eval.seq2seq.evaluate_seq2seq` (exact match, BLEU, chrF, as `lmforge
evaluate`), the decoder from the prompt end-of-text + "<input> => " until end-of-text or a newline,
scored the same way after strip. Decode speed: the same test sources, generated greedily by
`Engine.generate` in rounds that alternate the two models (median): generated tokens / wall time
(prefill or encoding included), and sources / s (the decoder writes one token more: the space).
The JSON's val_loss is each run's own (the T5's per target token, the decoder's per token of the
whole document): not comparable between the two.

    python benchmarks/seq2seq.py [--minutes 5] [--threads 1] [--work DIR] [--json OUT]
    python benchmarks/seq2seq.py --quick      # smoke run: 2,000 pairs, 0.3 minutes each
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lmforge
from lmforge.core.runtime import autocast, cpu_name
from lmforge.data.synthetic import date_records
from lmforge.eval.seq2seq import evaluate_seq2seq, seq2seq_scores
from lmforge.inference.engine import Engine, Request
from lmforge.inference.generate import encode_text
from lmforge.models.sizing import arch_config, sized_config
from lmforge.models.transformer import Transformer
from lmforge.text.tokenizer import Tokenizer, auto_vocab_size
from lmforge.training.config import PretrainConfig
from lmforge.training.pretrain import padded_vocab, pretrain


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_data(work: Path, sizes: tuple[int, int, int], seed: int) -> tuple[dict, dict[str, str]]:
    """The dates splits as pairs (for the T5) and as text documents (for the decoder), and a tokenizer."""
    splits = date_records(*sizes, seed)
    files = {s: write_jsonl(work / f"{s}.jsonl", rows) for s, rows in splits.items()}
    for s in ("train", "valid"):
        files[f"{s}_text"] = write_jsonl(work / f"{s}_text.jsonl", [{"text": doc(r)} for r in splits[s]])
    sides = [x for r in splits["train"] for x in (r["input"], r["target"])]  # the T5 recipe's tokenizer corpus
    vocab = auto_vocab_size(sum(len(x.encode()) + 1 for x in sides))
    Tokenizer.train(sides, vocab, show_progress=False).save(work / "tokenizer.json")
    files["tokenizer"] = str(work / "tokenizer.json")
    return splits, files


def doc(r: dict) -> str:
    return f"{r['input']} => {r['target']}"


def num_params(cfg) -> int:
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def decoder_shape(arch: str, vocab: int, ctx: int, target: int, width: int) -> tuple[int, int, int]:
    """(n_layer, n_embd, params) of the decoder closest to `target` parameters: within 5% at the
    T5's width if one is, else the closest width that is, else the closest count at all."""
    shapes = [(n, e, num_params(arch_config(arch, vocab, ctx, n, e))) for n in range(1, 25) for e in range(64, 769, 64)]
    near = [s for s in shapes if abs(s[2] / target - 1) <= 0.05]
    if not near:
        print(f"warning: no {arch} shape within 5% of {target:,} parameters; taking the closest")
        return min(shapes, key=lambda s: abs(s[2] - target))
    return min(near, key=lambda s: (abs(s[1] - width), abs(s[2] - target)))


def train(name: str, work: Path, args, **settings) -> dict:
    """One pretraining run of --minutes; no evaluation before the budget is spent (the T5's greedy
    validation would eat into its time), no checkpoints on the way."""
    out = work / name
    cfg = PretrainConfig(out=str(out), overwrite=True, max_minutes=args.minutes, device=args.device, seed=args.seed,
                         save_every=0, eval_every=10**9, eval_batches=4, keep="last", tensorboard=False,
                         tokenizer=str(work / "tokenizer.json"), **settings)
    rec = pretrain(cfg)
    final = rec.get("metrics") or {}
    return {"dir": str(out), "steps": rec["step"], "tokens": rec["tokens"], "train_seconds": round(rec["elapsed"], 1),
            "val_loss": final.get("val_loss"), "batch_size": cfg.batch_size, "context_length": cfg.context_length}


def decode(lm, prompts: list[list[int]], slots: int, max_new: int, stops: set[int], max_len: int
           ) -> tuple[list[str], int, float]:
    """Greedy outputs for `prompts` through one engine of `slots` slots: (texts, tokens written, seconds)."""
    engine = Engine(lm.model, slots=max(1, min(slots, len(prompts))), max_len=max_len)
    requests = [Request(p, max_tokens=min(max_new, engine.room(Request(p))), temperature=0, stop=stops)
                for p in prompts]
    with torch.no_grad(), autocast(lm.device):
        t = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - t
    samples = [r[0] for r in results]
    texts = [lm.tokenizer.decode(s.tokens, skip_special=True).split("\n")[0].strip() for s in samples]
    return texts, sum(len(s.tokens) for s in samples), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock training minutes of each model")
    ap.add_argument("--size", type=int, default=3, help="T5 blocks per stack (width 64 x N), as --size dN")
    ap.add_argument("--decoder-arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--context-length", type=int, default=32, help="T5: longest source and target; decoder: 2x")
    ap.add_argument("--batch-size", type=int, default=64, help="T5 training batch, and decode slots for both")
    ap.add_argument("--decoder-batch-size", type=int, default=None,
                    help="default: windows holding about --batch-size pairs")
    ap.add_argument("--rounds", type=int, default=3, help="decode timing rounds (alternating, median)")
    ap.add_argument("--threads", type=int, default=1, help="torch (and the engine's BLAS) threads, both models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--work", default=None, help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the JSON result here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000/200/200 pairs, 0.3 minutes each")
    args = ap.parse_args()
    sizes = (2000, 200, 200) if args.quick else (20000, 1000, 1000)
    if args.quick:
        args.minutes = min(args.minutes, 0.3)
    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lmforge-seq2seq-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, {args.device}; "
          f"work {work}", flush=True)

    splits, files = make_data(work, sizes, args.seed)
    tok = Tokenizer.from_file(files["tokenizer"])
    vocab, ctx, dctx = padded_vocab(tok.vocab_size), args.context_length, 2 * args.context_length
    t5_params = num_params(sized_config("t5", args.size, vocab, ctx))
    n_layer, n_embd, dec_params = decoder_shape(args.decoder_arch, vocab, dctx, t5_params, 64 * args.size)
    doc_tokens = statistics.mean(len(tok.encode(doc(r))) + 1 for r in splits["train"])
    dec_batch = args.decoder_batch_size or max(1, round(args.batch_size * doc_tokens / dctx))
    print(f"t5 d{args.size}: {t5_params:,} parameters; {args.decoder_arch} {n_layer} x {n_embd}: {dec_params:,} "
          f"({100 * (dec_params / t5_params - 1):+.1f}%); vocab {tok.vocab_size}; decoder batch {dec_batch} x {dctx} "
          f"tokens ({doc_tokens:.1f} tokens per document)", flush=True)

    runs = {"encoder-decoder": train("t5", work, args, data=[files["train"]], val_data=[files["valid"]],
                                     objective="seq2seq", arch="t5", size=f"d{args.size}", context_length=ctx,
                                     batch_size=args.batch_size),
            "decoder-only": train("decoder", work, args, data=[files["train_text"]], val_data=[files["valid_text"]],
                                  objective="clm", arch=args.decoder_arch, n_layer=n_layer, n_embd=n_embd,
                                  context_length=dctx, batch_size=dec_batch)}
    t5 = lmforge.load(runs["encoder-decoder"]["dir"], device=args.device)
    dec = lmforge.load(runs["decoder-only"]["dir"], device=args.device)
    test = splits["test"]
    targets = [r["target"] for r in test]
    max_new = min(ctx, 2 * max(len(encode_text(tok, t)[0]) for t in targets) + 16)  # evaluate's own rule
    newline = {i for i in range(tok.vocab_size) if "\n" in tok.decode([i])}
    eot = tok.eot_id
    if tok.encode(doc(test[0]))[:len(tok.encode(f"{test[0]['input']} => "))] != tok.encode(f"{test[0]['input']} => "):
        print("warning: the prompt '<input> => ' tokenizes differently from the training documents")
    sides = {  # (model, prompts, stop ids, engine length)
        "encoder-decoder": (t5, [encode_text(tok, r["input"], ctx)[0] for r in test], t5.stop_ids(), max_new),
        "decoder-only": (dec, [[eot, *tok.encode(f"{r['input']} => ")] for r in test], dec.stop_ids() | newline, dctx)}

    for name, (lm, prompts, stops, max_len) in sides.items():
        runs[name]["params"] = lm.model.num_params()
        if name == "encoder-decoder":
            scores = evaluate_seq2seq(lm, files["test"], batch_size=args.batch_size)
        else:
            texts, _, _ = decode(lm, prompts, args.batch_size, max_new, stops, max_len)
            scores = {k: round(v, 4) for k, v in seq2seq_scores(texts, targets).items()}
            for r, p in list(zip(test, texts))[:3]:
                print(f"  sample  {r['input']!r} -> {p!r} (want {r['target']!r})")
        runs[name].update(scores)
        decode(lm, prompts[:args.batch_size], args.batch_size, max_new, stops, max_len)  # warm-up
    timing: dict[str, list] = {n: [] for n in sides}
    for i in range(args.rounds):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            lm, prompts, stops, max_len = sides[name]
            _, tokens, seconds = decode(lm, prompts, args.batch_size, max_new, stops, max_len)
            timing[name].append((tokens / seconds, len(prompts) / seconds))
    for name, rows in timing.items():
        runs[name]["decode_tokens_per_sec"] = round(statistics.median(r[0] for r in rows), 1)
        runs[name]["decode_sources_per_sec"] = round(statistics.median(r[1] for r in rows), 1)
        runs[name]["decode_rounds"] = [[round(a, 1), round(b, 1)] for a, b in rows]

    ed, do = runs["encoder-decoder"], runs["decoder-only"]
    print(f"\n{'':<22}{'encoder-decoder':>18}{'decoder-only':>18}{'ratio ed/dec':>14}")
    for key, fmt in (("params", ",.0f"), ("steps", ",.0f"), ("train_seconds", ".0f"), ("exact_match", ".3f"),
                     ("chrf", ".2f"), ("decode_tokens_per_sec", ",.0f"), ("decode_sources_per_sec", ",.0f")):
        ratio = ed[key] / do[key] if do[key] else float("nan")
        print(f"{key:<22}{ed[key]:>18{fmt}}{do[key]:>18{fmt}}{ratio:>14.2f}")
    result = {"benchmark": "seq2seq", "machine": cpu_name(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "threads": args.threads, "torch": torch.__version__, "device": args.device, "minutes": args.minutes,
              "quick": args.quick, "test_examples": len(test), "decode_slots": args.batch_size,
              "decoder_shape": {"arch": args.decoder_arch, "n_layer": n_layer, "n_embd": n_embd},
              "t5_size": f"d{args.size}", "encoder_decoder": ed, "decoder_only": do,
              "exact_match_ratio": round(ed["exact_match"] / do["exact_match"], 3) if do["exact_match"] else None,
              "decode_tokens_per_sec_ratio": round(ed["decode_tokens_per_sec"] / do["decode_tokens_per_sec"], 3)}
    if tmp:  # the runs go with the temporary folder
        for r in (ed, do):
            del r["dir"]
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
