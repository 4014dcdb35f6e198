"""What each verb does: parse its dataclass, call one library function, print the result.

Imports are inside the functions so that a verb loads only what it uses (and `--help` nothing).
Machine-readable results go to stdout as one JSON object; human chatter goes to stderr.
"""

from __future__ import annotations

import json
import re
import sys

from ..core.config import from_namespace
from ..core.errors import LMForgeError
from ..training.config import ClassifyConfig, InstructConfig, PretrainConfig, Seq2SeqConfig
from .args import (
    ChatArgs,
    ClassifyArgs,
    DemoArgs,
    EmbedArgs,
    EvaluateArgs,
    ExportArgs,
    FillMaskArgs,
    GenerateArgs,
    ImportArgs,
    MergeLoraArgs,
    SamplingArgs,
    ServeArgs,
    TokenizerEncodeArgs,
    TokenizerTrainArgs,
)


def read_text_arg(text: str | None, what: str) -> str:
    if text is None:
        raise LMForgeError(f"--{what} is required")
    return sys.stdin.read() if text == "-" else text


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line mean newline, tab, return, backslash."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def sampling(a: SamplingArgs) -> dict:
    """The sampling settings of a verb, as keyword arguments for `LM.generate` / `generate_text`."""
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
            "repetition_penalty": a.repetition_penalty, "presence_penalty": a.presence_penalty,
            "frequency_penalty": a.frequency_penalty}


def print_summary(state: dict, keys) -> None:
    """The final metrics of a training run, as one JSON line (rank 0 only under torchrun)."""
    if state.get("rank", 0) != 0:
        return
    m = state.get("metrics", {})
    print(json.dumps({k: m[k] for k in keys if k in m}))


def pretrain(ns) -> None:
    cfg = from_namespace(PretrainConfig, ns)

    from ..training.pretrain import pretrain

    print_summary(pretrain(cfg), ("step", "tokens", "loss", "val_loss", "val_bpb", "val_exact_match"))


def finetune_classify(ns) -> None:
    cfg = from_namespace(ClassifyConfig, ns)

    from ..training.tasks.classify import finetune_classify

    print_summary(finetune_classify(cfg), ("step", "loss", "val_loss", "val_accuracy", "val_macro_f1"))


def finetune_instruct(ns) -> None:
    cfg = from_namespace(InstructConfig, ns)

    from ..training.tasks.instruct import finetune_instruct

    print_summary(finetune_instruct(cfg), ("step", "tokens", "loss", "val_loss"))


def finetune_seq2seq(ns) -> None:
    cfg = from_namespace(Seq2SeqConfig, ns)

    from ..training.tasks.seq2seq import finetune_seq2seq

    print_summary(finetune_seq2seq(cfg), ("step", "tokens", "loss", "val_loss", "val_exact_match"))


def read_json_file(path: str, flag: str) -> object:
    """A JSON file a flag names, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise LMForgeError(f"{flag}: cannot read {path} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{flag}: {path} is not valid JSON ({e})") from None


def generate(ns) -> None:
    a = from_namespace(GenerateArgs, ns)

    from ..api import load
    from ..inference.generate import Picked, prepare_prompt
    prompt = read_text_arg(a.prompt, "prompt")
    stops = [unescape(s) for s in a.stop]
    schema = read_json_file(a.json_schema, "--json-schema") if a.json_schema else None
    lm = load(a.model_dir, device=a.device, quantize=a.quantize)
    lm.check_writes_text()
    try:  # before any output: a bad schema fails first
        grammar = lm.grammar(json_schema=schema, regex=a.regex)
    except LMForgeError as e:
        raise LMForgeError(f"{'--json-schema' if schema is not None else '--regex'}: cannot enforce it: {e}") from None
    ids, note = prepare_prompt(lm.tokenizer, lm.config, prompt, a.max_new_tokens, a.truncate)  # before any output
    if note:
        print(f"warning: {note}", file=sys.stderr)
        prompt = "…" + lm.tokenizer.decode(ids, skip_special=True)
    out = sys.stdout
    echo = a.echo and lm.kind.generates

    def show(step: int, ranked: list[tuple[str, float]], picked: Picked) -> None:
        cands = "  ".join(f"{t!r} {p:6.2%}" for t, p in ranked)
        out.write(f"[{step:3d}] {picked.text!r:>14} <- {cands}   picked #{picked.rank} ({picked.prob:.1%})\n")

    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        if a.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        if a.top_candidates:
            text = lm.generate(prompt, prompt_ids=ids, seed=seed, stop=stops, top_candidates=a.top_candidates,
                               on_candidates=show, grammar=grammar, **sampling(a))
            out.write(f"\n{prompt if echo else ''}{text}\n")
            continue
        if echo:
            out.write(prompt)
        lm.generate(prompt, prompt_ids=ids, seed=seed, stop=stops, stream=lambda s: (out.write(s), out.flush()),
                    grammar=grammar, **sampling(a))
        out.write("\n")


def chat(ns) -> None:
    a = from_namespace(ChatArgs, ns)

    from ..api import load
    from ..inference.chat import chat

    lm = load(a.model_dir, device=a.device, quantize=a.quantize)
    chat(lm, a.system, seed=a.seed, **sampling(a))


def evaluate(ns) -> None:
    a = from_namespace(EvaluateArgs, ns)

    from ..eval.evaluate import evaluate
    from ..formats.load import load_model

    if not a.data:
        raise LMForgeError("--data is required")
    lm = load_model(a.model_dir, device=a.device, quantize=a.quantize)
    print(json.dumps(evaluate(lm, a.data, a.text_field, a.batch_size, input_column=a.input_column,
                              target_column=a.target_column, max_new_tokens=a.max_new_tokens), ensure_ascii=False))


def classify(ns) -> None:
    a = from_namespace(ClassifyArgs, ns)

    from ..data.records import read_texts
    from ..formats.load import load_model
    from ..inference.classify import classify_texts

    texts = read_texts(a.text, a.file, a.text_field, "classify")
    lm = load_model(a.model_dir, device=a.device)
    for text, r in zip(texts, classify_texts(lm, texts)):
        if a.json:
            print(json.dumps({"text": text, **r}, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in sorted(r["probs"].items(), key=lambda kv: -kv[1]))
            print(f"{r['label']}\t{probs}\t{text[:80]!r}")


def merge_lora(ns) -> None:
    a = from_namespace(MergeLoraArgs, ns)

    from ..formats.load import merge_adapter

    if not a.out:
        raise LMForgeError("--out is required")
    merge_adapter(a.model_dir, a.out, a.overwrite)


def import_(ns) -> None:
    a = from_namespace(ImportArgs, ns)

    from ..formats.gguf import is_gguf
    from ..formats.gguf_load import import_gguf
    from ..formats.hf_dir import import_hf
    from ..formats.load import builtin_model

    if not a.out:
        raise LMForgeError("--out is required")
    if is_gguf(a.hf_dir):
        out = import_gguf(a.hf_dir, a.out, a.overwrite)
    else:
        out = import_hf(builtin_model(a.hf_dir) or a.hf_dir, a.out, a.dtype, a.overwrite)
    print(f"imported {a.hf_dir} -> {out}", file=sys.stderr)


def export(ns) -> None:
    a = from_namespace(ExportArgs, ns)

    from ..formats.gguf import export_gguf
    from ..formats.hf_dir import export_hf

    if not a.out:
        raise LMForgeError("--out is required")
    from ..formats.load import builtin_model

    if builtin_model(a.model_dir):  # found by name, as embed, import and finetune find it
        raise LMForgeError(f"{a.model_dir} is an encoder (all-MiniLM-L6-v2, built in); export writes language "
                           "models (decoders) for transformers and llama.cpp")
    if a.format == "gguf":
        export_gguf(a.model_dir, a.out, a.outtype, a.overwrite, a.ollama)
        return
    export_hf(a.model_dir, a.out, a.shard_size_mb, a.overwrite, a.dtype)


def embed(ns) -> None:
    a = from_namespace(EmbedArgs, ns)

    from ..data.records import read_texts
    from ..formats.load import load_model
    from ..inference.embed import check_embeddings_path, embed_texts, rank, write_embeddings

    if a.out:
        check_embeddings_path(a.out)  # before the work, not after
    texts = read_texts(a.text, a.file, a.text_field)
    lm = load_model(a.model_dir, device=a.device)
    vectors = embed_texts(lm, texts, a.batch_size, a.truncate)
    if a.query is not None:
        q = embed_texts(lm, [a.query], truncate=a.truncate)[0]
        for i, score in rank(q, vectors)[:a.top_k]:
            print(f"{score:.4f}  {texts[i]}")
    elif a.out:
        write_embeddings(a.out, texts, vectors)
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {a.out}", file=sys.stderr)
    else:
        print(json.dumps({"dim": int(vectors.shape[1]), "texts": texts,
                          "embeddings": [[round(float(v), 6) for v in row] for row in vectors]}, ensure_ascii=False))


def fill_mask(ns) -> None:
    a = from_namespace(FillMaskArgs, ns)

    from ..formats.load import load_model
    from ..inference.embed import fill_mask

    results = fill_mask(load_model(a.model_dir, device=a.device), a.text, a.top_k)
    if a.json:
        print(json.dumps({"text": a.text, "masks": results}, ensure_ascii=False))
        return
    for n, options in enumerate(results, 1):
        if len(results) > 1:
            print(f"mask {n}:")
        for r in options:
            print(f"  {r['prob']:7.2%}  {r['token']:<15} {r['sequence']}")


def demo(ns) -> None:
    a = from_namespace(DemoArgs, ns)

    from .demo import demo

    demo(a.minutes, a.out, a.arch, a.seed, a.device)


def tokenizer_train(ns) -> None:
    a = from_namespace(TokenizerTrainArgs, ns)

    from ..text.corpus import load_corpus
    from ..text.tokenizer import Tokenizer, auto_vocab_size

    corpus = load_corpus(a.data, a.text_field)
    tok = Tokenizer.train(corpus.documents, a.vocab_size or auto_vocab_size(corpus.num_bytes),
                          show_progress=sys.stderr.isatty())
    tok.save(a.out)
    print(f"wrote {a.out}: {tok.vocab_size} tokens from {corpus.num_bytes / 1e6:.2f} MB", file=sys.stderr)


def tokenizer_encode(ns) -> None:
    a = from_namespace(TokenizerEncodeArgs, ns)

    from ..text.tokenizer import Tokenizer, printable

    tok = Tokenizer.from_file(a.tokenizer)
    text = read_text_arg(a.text, "text")
    ids = tok.encode(text)
    pieces = [tok.piece(i) for i in ids]  # partial characters as <0xC3> bytes, not as U+FFFD
    if a.json:
        print(json.dumps({"ids": ids, "tokens": pieces}, ensure_ascii=False))
        return
    for i, p in zip(ids, pieces):
        print(f"{i:>8}  {printable(p)}")
    print(f"{len(ids)} tokens, {len(text.encode())} bytes", file=sys.stderr)


def serve(ns) -> None:
    a = from_namespace(ServeArgs, ns)

    from ..serve.server import serve

    serve(a.model_dir, a.host, a.port, a.api_key, a.cors_origin, a.max_body, a.max_queue, a.slots, a.device, a.name,
          a.feedback, a.quantize, prefill_chunk=a.prefill_chunk,
          cache_mb=a.cache_mb if a.prefix_cache else 0, inspect=a.inspect)
