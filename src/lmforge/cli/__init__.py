"""The `lmforge` command: one verb per stage, each a thin layer over a library function.

Every verb takes `--config FILE.yaml` (keys = flag names) with flags overriding the file.
Problems with the input are reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass

from ..core.config import add_arguments, arg, from_namespace
from ..core.errors import LMForgeError


@dataclass
class GenerateArgs:
    """Generate text from a prompt."""

    model_dir: str = arg(None, "model directory", positional=True)
    prompt: str = arg(None, "text to continue ('-' reads it from stdin)", short="-p")
    max_new_tokens: int | None = arg(None, "most new tokens to generate (default: 200, or as many as fit in "
                                     "the context window)")
    temperature: float = arg(0.8, "randomness: 0 = greedy (always the most likely token), 1 = the model's "
                             "own distribution, higher = wilder")
    top_k: int | None = arg(None, "sample only among the K most likely tokens")
    top_p: float | None = arg(None, "sample only among the most likely tokens whose probabilities sum to P")
    seed: int | None = arg(None, "random seed: the same seed gives the same text")
    repetition_penalty: float = arg(1.0, "above 1 makes tokens already in the text less likely (1.1-1.3 curbs "
                                    "loops in small models)")
    stop: list[str] = arg([], "stop when this string appears (repeatable; not included in the output; \\n and \\t "
                          "mean newline and tab)")
    top_candidates: int = arg(0, "print, at each step, the K most likely next tokens and their probabilities")
    num_samples: int = arg(1, "how many completions to generate (seeds seed, seed+1, ...)", short="-n")
    echo: bool = arg(True, "print the prompt before the completion")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class EvaluateArgs:
    """Measure a model, printing one JSON object: on text, loss / perplexity / bits per byte; on
    instruction records (.jsonl with instruction/output or messages), exact match of greedy
    answers; for a classifier on a labelled file, accuracy, macro-F1, per-class precision/recall
    and the confusion matrix."""

    model_dir: str = arg(None, "model directory", positional=True)
    data: list[str] = arg([], "text files, directories, .jsonl files, or 'pydocs'")
    text_field: str = arg("text", "field holding the text in .jsonl files")
    batch_size: int = arg(8, "windows per forward pass")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class DemoArgs:
    """Build the pydocs corpus, train a tokenizer and a small GPT, then sample from it."""

    minutes: float = arg(4.0, "pretraining time budget")
    out: str = arg("runs/demo", "model directory to write (replaced if it exists)")
    arch: str = arg("gpt2", "gpt2 or llama", choices=["gpt2", "llama"])
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class TokenizerTrainArgs:
    """Train a byte-level BPE tokenizer."""

    data: list[str] = arg(["pydocs"], "text files, directories, .jsonl files, or 'pydocs'")
    out: str = arg("tokenizer.json", "where to write tokenizer.json")
    vocab_size: int | None = arg(None, "vocabulary size (default: from the corpus size)")
    text_field: str = arg("text", "field holding the text in .jsonl files")


@dataclass
class TokenizerEncodeArgs:
    """Show how a tokenizer splits text."""

    tokenizer: str = arg(None, "tokenizer.json, or a model directory", positional=True)
    text: str = arg(None, "text to encode ('-' reads stdin)")
    json: bool = arg(False, "print one JSON object (ids and tokens) instead of a table")


@dataclass
class ImportArgs:
    """Convert a Hugging Face checkpoint (config.json + safetensors + tokenizer.json) into an lmforge
    model directory. Supported families: GPT-2, Llama (incl. Llama 3 rope scaling), Mistral, Qwen2,
    Qwen3, and Llama-style models such as SmolLM."""

    hf_dir: str = arg(None, "Hugging Face model directory", positional=True)
    out: str = arg(None, "lmforge model directory to write")
    dtype: str = arg("auto", "weight precision: auto (as stored), float32, bfloat16 or float16",
                     choices=["auto", "float32", "bfloat16", "float16"])
    overwrite: bool = arg(False, "replace --out if it exists")


@dataclass
class ExportArgs:
    """Write a model directory as a Hugging Face checkpoint that `transformers` loads with
    AutoModelForCausalLM/AutoTokenizer.from_pretrained."""

    model_dir: str = arg(None, "lmforge model directory", positional=True)
    format: str = arg("hf", "output format", choices=["hf"])
    out: str = arg(None, "directory to write")
    shard_size_mb: float = arg(2000.0, "split the weights into files of at most this many MB")
    dtype: str = arg("auto", "weight precision: auto (as stored), float32, bfloat16 or float16",
                     choices=["auto", "float32", "bfloat16", "float16"])
    overwrite: bool = arg(False, "replace --out if it exists")


@dataclass
class ClassifyArgs:
    """Label texts with a fine-tuned classifier."""

    model_dir: str = arg(None, "classifier model directory (from `lmforge finetune classify`)", positional=True)
    text: list[str] = arg([], "text(s) to classify")
    file: str | None = arg(None, "classify each line of this file (or each row of a .csv/.tsv/.jsonl)")
    text_field: str = arg("text", "column / field holding the text in .csv/.tsv/.jsonl files")
    json: bool = arg(False, "print one JSON object per text: {text, label, probs}")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class MergeLoraArgs:
    """Fold a LoRA adapter into its base model's weights: a plain model directory, no base needed."""

    model_dir: str = arg(None, "adapter directory (from fine-tuning with --lora-rank)", positional=True)
    out: str = arg(None, "model directory to write")
    overwrite: bool = arg(False, "replace --out if it exists")


@dataclass
class ChatArgs:
    """Talk to a model in the terminal, multi-turn, with the prompt format it was tuned with.
    Type /reset to start over and /exit to quit."""

    model_dir: str = arg(None, "model directory or Hugging Face checkpoint", positional=True)
    system: str | None = arg(None, "system message that sets the assistant's behaviour")
    max_new_tokens: int = arg(256, "longest answer in tokens")
    temperature: float = arg(0.7, "randomness (0 = greedy)")
    top_p: float | None = arg(0.9, "nucleus sampling threshold")
    top_k: int | None = arg(None, "sample among the K most likely tokens only")
    seed: int | None = arg(None, "random seed for reproducible answers")
    repetition_penalty: float = arg(1.0, "above 1 discourages repeating tokens already in the conversation")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class EmbedArgs:
    """Sentence embeddings from an encoder: the mean of its final hidden states over the real tokens,
    L2-normalised (so a dot product is a cosine similarity). With --query, rank the texts by
    similarity to it (semantic search). `minilm` names the bundled all-MiniLM-L6-v2 model."""

    model_dir: str = arg(None, "encoder model directory, Hugging Face checkpoint, or minilm", positional=True)
    text: list[str] = arg([], "text(s) to embed")
    file: str | None = arg(None, "embed each non-empty line of this file (or the text column of a .csv/.tsv/.jsonl)")
    query: str | None = arg(None, "rank the texts by cosine similarity to this query instead of printing vectors")
    top_k: int = arg(10, "with --query: how many of the best matches to show")
    out: str | None = arg(None, "write the embeddings to FILE.npy (numpy) or FILE.json instead of stdout")
    batch_size: int = arg(32, "texts per forward pass")
    truncate: bool = arg(True, "cut texts longer than the model reads (with a warning); --no-truncate: error")
    device: str = arg("auto", "cpu, cuda, mps or auto")


@dataclass
class FillMaskArgs:
    """Predict the masked word(s) in a text with a masked-language model (BERT-style)."""

    model_dir: str = arg(None, "masked-LM model directory or Hugging Face checkpoint", positional=True)
    text: str = arg(None, "text with [MASK] where a word is missing", positional=True)
    top_k: int = arg(5, "how many candidates to show per mask")
    json: bool = arg(False, "print one JSON object")
    device: str = arg("auto", "cpu, cuda, mps or auto")


# --- verbs ---------------------------------------------------------------------------------------

def _read_text_arg(text: str | None, what: str) -> str:
    if text is None:
        raise LMForgeError(f"--{what} is required")
    return sys.stdin.read() if text == "-" else text


def _unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line mean newline, tab, return, backslash."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def cmd_pretrain(ns) -> None:
    from ..training.pretrain import PretrainConfig, pretrain

    state = pretrain(from_namespace(PretrainConfig, ns))
    m = state.get("metrics", {})
    summary = {k: m[k] for k in ("step", "tokens", "loss", "val_loss", "val_bpb") if k in m}
    print(json.dumps(summary))


def cmd_generate(ns) -> None:
    from ..api import load

    a = from_namespace(GenerateArgs, ns)
    prompt = _read_text_arg(a.prompt, "prompt")
    stops = [_unescape(s) for s in a.stop]
    lm = load(a.model_dir, device=a.device)
    out = sys.stdout

    def show(step: int, ranked: list[tuple[str, float]], chosen: str) -> None:
        cands = "  ".join(f"{t!r} {p:6.2%}" for t, p in ranked)
        out.write(f"[{step:3d}] {chosen!r:>14} <- {cands}\n")

    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        if a.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        if a.top_candidates:
            text = lm.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, seed=seed, stop=stops, top_candidates=a.top_candidates,
                               repetition_penalty=a.repetition_penalty,
                               on_candidates=show)
            out.write(f"\n{prompt if a.echo else ''}{text}\n")
            continue
        if a.echo:
            out.write(prompt)
        lm.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                    top_p=a.top_p, seed=seed, stop=stops, repetition_penalty=a.repetition_penalty,
                    stream=lambda s: (out.write(s), out.flush()))
        out.write("\n")


def cmd_evaluate(ns) -> None:
    from ..api import load
    from ..eval.evaluate import evaluate_text

    a = from_namespace(EvaluateArgs, ns)
    if not a.data:
        raise LMForgeError("--data is required")
    lm = load(a.model_dir, device=a.device)
    if lm.meta.get("kind") == "classifier":
        from ..eval.evaluate import evaluate_classifier

        if len(a.data) != 1:
            raise LMForgeError("a classifier is evaluated on one labelled file (--data FILE)")
        label_field = lm.meta.get("label_field", "label")
        print(json.dumps(evaluate_classifier(lm, a.data[0], a.text_field, label_field), ensure_ascii=False))
        return
    from ..data.records import looks_like_instructions
    from ..eval.evaluate import evaluate_instructions

    if len(a.data) == 1 and looks_like_instructions(a.data[0]):
        print(json.dumps(evaluate_instructions(lm, a.data[0])))
        return
    print(json.dumps(evaluate_text(lm, a.data, a.text_field, a.batch_size)))


def cmd_finetune_classify(ns) -> None:
    from ..training.tasks.classify import ClassifyConfig, finetune_classify

    _print_summary(finetune_classify(from_namespace(ClassifyConfig, ns)),
                   ("step", "loss", "val_loss", "val_accuracy", "val_macro_f1"))


def cmd_finetune_instruct(ns) -> None:
    from ..training.tasks.instruct import InstructConfig, finetune_instruct

    _print_summary(finetune_instruct(from_namespace(InstructConfig, ns)), ("step", "tokens", "loss", "val_loss"))


def _print_summary(state: dict, keys) -> None:
    m = state.get("metrics", {})
    print(json.dumps({k: m[k] for k in keys if k in m}))


def cmd_classify(ns) -> None:
    from ..api import load
    from ..inference.classify import classify_texts

    a = from_namespace(ClassifyArgs, ns)
    texts = _texts(a.text, a.file, a.text_field, "classify")
    lm = load(a.model_dir, device=a.device)
    for text, r in zip(texts, classify_texts(lm, texts)):
        if a.json:
            print(json.dumps({"text": text, **r}, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in sorted(r["probs"].items(), key=lambda kv: -kv[1]))
            print(f"{r['label']}\t{probs}\t{text[:80]!r}")


def cmd_merge_lora(ns) -> None:
    from ..formats.load import merge_adapter

    a = from_namespace(MergeLoraArgs, ns)
    if not a.out:
        raise LMForgeError("--out is required")
    merge_adapter(a.model_dir, a.out, a.overwrite)


def cmd_chat(ns) -> None:
    from ..api import load
    from ..inference.chat import chat

    a = from_namespace(ChatArgs, ns)
    lm = load(a.model_dir, device=a.device)
    chat(lm, a.system, a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.seed, a.repetition_penalty)


def cmd_import(ns) -> None:
    from ..formats.hf_dir import import_hf
    from ..formats.load import builtin_model

    a = from_namespace(ImportArgs, ns)
    if not a.out:
        raise LMForgeError("--out is required")
    out = import_hf(builtin_model(a.hf_dir) or a.hf_dir, a.out, a.dtype, a.overwrite)
    print(f"imported {a.hf_dir} -> {out}", file=sys.stderr)


def cmd_export(ns) -> None:
    from ..formats.hf_dir import export_hf

    a = from_namespace(ExportArgs, ns)
    if not a.out:
        raise LMForgeError("--out is required")
    export_hf(a.model_dir, a.out, a.shard_size_mb, a.overwrite, a.dtype)


def _texts(text: list[str], file: str | None, text_field: str = "text", what: str = "embed") -> list[str]:
    """--text values plus --file: the text column of a .csv/.tsv/.jsonl, else each non-empty line."""
    from pathlib import Path

    texts = list(text)
    if file:
        path = Path(file)
        if not path.exists():
            raise LMForgeError(f"no such file: {path}")
        if path.suffix.lower() in (".csv", ".tsv", ".tab", ".jsonl", ".json"):
            from ..data.records import read_labelled

            texts += read_labelled(path, text_field, None)[0]
        else:
            texts += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip()]
    if not texts:
        raise LMForgeError(f"nothing to {what}: give --text or --file")
    return texts


def cmd_embed(ns) -> None:
    from pathlib import Path

    import numpy as np

    from ..api import load
    from ..core.fileio import atomic_path, atomic_write
    from ..inference.embed import embed_texts, rank

    a = from_namespace(EmbedArgs, ns)
    texts = _texts(a.text, a.file)
    lm = load(a.model_dir, device=a.device)
    vectors = embed_texts(lm, texts, a.batch_size, a.truncate)
    if a.query is not None:
        q = embed_texts(lm, [a.query], truncate=a.truncate)[0]
        for i, score in rank(q, vectors)[:a.top_k]:
            print(f"{score:.4f}  {texts[i]}")
        return
    if a.out:
        out = Path(a.out)
        if out.suffix == ".npy":
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, vectors)
        elif out.suffix == ".json":
            atomic_write(out, json.dumps({"texts": texts, "embeddings": vectors.tolist()}))
        else:
            raise LMForgeError("--out must end in .npy or .json")
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}", file=sys.stderr)
        return
    print(json.dumps({"dim": int(vectors.shape[1]), "texts": texts,
                      "embeddings": [[round(float(v), 6) for v in row] for row in vectors]}, ensure_ascii=False))


def cmd_fill_mask(ns) -> None:
    from ..api import load
    from ..inference.embed import fill_mask

    a = from_namespace(FillMaskArgs, ns)
    lm = load(a.model_dir, device=a.device)
    results = fill_mask(lm, a.text, a.top_k)
    if a.json:
        print(json.dumps({"text": a.text, "masks": results}, ensure_ascii=False))
        return
    for n, options in enumerate(results, 1):
        if len(results) > 1:
            print(f"mask {n}:")
        for r in options:
            print(f"  {r['prob']:7.2%}  {r['token']:<15} {r['sequence']}")


def cmd_demo(ns) -> None:
    from .demo import demo

    a = from_namespace(DemoArgs, ns)
    demo(a.minutes, a.out, a.arch, a.seed, a.device)


def cmd_tokenizer_train(ns) -> None:
    from ..text.corpus import load_corpus
    from ..text.tokenizer import Tokenizer, auto_vocab_size

    a = from_namespace(TokenizerTrainArgs, ns)
    corpus = load_corpus(a.data, a.text_field)
    vocab = a.vocab_size or auto_vocab_size(corpus.num_bytes)
    if vocab < 256 + 16:
        raise LMForgeError("--vocab-size must be at least 272 (256 bytes + 16 special tokens)")
    tok = Tokenizer.train(corpus.documents, vocab, show_progress=sys.stderr.isatty())
    tok.save(a.out)
    print(f"wrote {a.out}: {tok.vocab_size} tokens from {corpus.num_bytes / 1e6:.2f} MB", file=sys.stderr)


def cmd_tokenizer_encode(ns) -> None:
    from pathlib import Path

    from ..text.tokenizer import Tokenizer

    a = from_namespace(TokenizerEncodeArgs, ns)
    tok = Tokenizer.from_file(Path(a.tokenizer))
    text = _read_text_arg(a.text, "text")
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    if a.json:
        print(json.dumps({"ids": ids, "tokens": pieces}, ensure_ascii=False))
        return
    for i, p in zip(ids, pieces):
        print(f"{i:>8}  {p!r}")
    print(f"{len(ids)} tokens, {len(text.encode())} bytes", file=sys.stderr)


# --- parser ----------------------------------------------------------------------------------------

EXAMPLES = {
    "pretrain": """examples:
  lmforge pretrain --data pydocs --out runs/py --max-minutes 10          # size chosen for the budget
  lmforge pretrain --data notes/ more.jsonl --out runs/notes --arch llama --size d6 --max-steps 2000
  lmforge pretrain --out runs/py --resume --max-minutes 20               # continue, exactly
  torchrun --nproc_per_node 4 -m lmforge pretrain --data corpus/ --out runs/big --max-tokens 1e9""",
    "generate": """examples:
  lmforge generate runs/demo --prompt "Return the" --temperature 0.7 --top-k 40 --seed 1
  lmforge generate runs/demo -p "class" --temperature 0                  # greedy
  lmforge generate runs/demo -p "The module" --top-candidates 5 --max-new-tokens 5""",
    "import": """examples:
  lmforge import ~/models/SmolLM2-135M --out runs/smol
  lmforge generate runs/smol --prompt "The capital of France is" --temperature 0""",
    "export": """example:
  lmforge export runs/py --format hf --out hf/py
  # then, in Python: AutoModelForCausalLM.from_pretrained("hf/py"), AutoTokenizer.from_pretrained("hf/py")""",
    "classify": """examples:
  lmforge classify runs/spam --text "WIN a FREE cruise, click now" "see you at lunch"
  lmforge classify runs/spam --file inbox.txt --json""",
    "chat": """example:
  lmforge chat runs/assistant --system "You are a concise assistant."
  you> What does zip() do?""",
    "merge-lora": """example:
  lmforge merge-lora runs/spam-lora --out runs/spam-merged""",
    "embed": """examples:
  lmforge embed minilm --text "A cat sits on the mat." "Stocks fell sharply." --out vectors.npy
  lmforge embed minilm --file faq.txt --query "how do I reset my password?" --top-k 3""",
    "fill-mask": """example:
  lmforge fill-mask runs/bert "The [MASK] function returns a new list." """,
    "evaluate": """example:
  lmforge evaluate runs/demo --data held_out.txt
  -> {"loss": 3.21, "perplexity": 24.8, "bits_per_byte": 1.27, "tokens": 52110}""",
}


def _add_verb(sub, name: str, cls, func, help_text: str):
    p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip(),
                       epilog=EXAMPLES.get(name), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, cls)
    p.set_defaults(func=func, cls=cls)
    return p


def build_parser() -> argparse.ArgumentParser:
    from ..training.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(
        prog="lmforge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmforge: train, run and adapt language models, end to end.",
        epilog="Run `lmforge VERB --help` for each verb's options. Start with `lmforge demo`.")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    _add_verb(sub, "demo", DemoArgs, cmd_demo, "train a small GPT on Python's docs and sample from it (~5 min)")
    _add_verb(sub, "pretrain", PretrainConfig, cmd_pretrain,
              "pretrain a model on raw text (next-token prediction)")
    _add_verb(sub, "generate", GenerateArgs, cmd_generate, "generate text from a prompt")
    _add_verb(sub, "evaluate", EvaluateArgs, cmd_evaluate, "loss, perplexity and bits per byte on text (JSON)")
    _add_verb(sub, "import", ImportArgs, cmd_import, "convert a Hugging Face checkpoint into a model directory")
    _add_verb(sub, "export", ExportArgs, cmd_export, "write a model directory as a Hugging Face checkpoint")
    ft = sub.add_parser("finetune", help="fine-tune a model: classify (labelled texts) or instruct (instructions)",
                        description="Fine-tune a pretrained (or imported) model, fully or with LoRA.")
    fsub = ft.add_subparsers(dest="sub", metavar="TASK", required=True)
    from ..training.tasks.classify import ClassifyConfig
    from ..training.tasks.instruct import InstructConfig

    _add_verb(fsub, "classify", ClassifyConfig, cmd_finetune_classify, "train a classifier on labelled texts")
    _add_verb(fsub, "instruct", InstructConfig, cmd_finetune_instruct, "teach a model to follow instructions")
    _add_verb(sub, "classify", ClassifyArgs, cmd_classify, "label texts with a fine-tuned classifier")
    _add_verb(sub, "chat", ChatArgs, cmd_chat, "talk to a model in the terminal")
    _add_verb(sub, "merge-lora", MergeLoraArgs, cmd_merge_lora, "fold a LoRA adapter into its base model")
    _add_verb(sub, "embed", EmbedArgs, cmd_embed, "sentence embeddings and semantic search with an encoder")
    _add_verb(sub, "fill-mask", FillMaskArgs, cmd_fill_mask, "predict masked words with a BERT-style model")
    tok = sub.add_parser("tokenizer", help="train a tokenizer, or see how one splits text",
                         description="Byte-level BPE tokenizers (Hugging Face tokenizer.json format).")
    tsub = tok.add_subparsers(dest="sub", metavar="ACTION", required=True)
    _add_verb(tsub, "train", TokenizerTrainArgs, cmd_tokenizer_train, "train a BPE tokenizer on text")
    _add_verb(tsub, "encode", TokenizerEncodeArgs, cmd_tokenizer_encode, "show the tokens of a text")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        ns.func(ns)
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
