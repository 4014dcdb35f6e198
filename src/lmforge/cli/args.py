"""The flags of the verbs that do not train: one dataclass per verb (fields become `--flags`).

Torch-free on purpose: `lmforge --help` and argument errors answer without importing torch.
Numbers carry their bounds (`ge=`, `gt=`, ...), checked by `core.config.check` for every verb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import arg
from ..inference.params import SamplingParams
from ..text.tokenizer import MIN_VOCAB

DEVICE_HELP = "cpu, cuda, cuda:N, mps, or auto"
QUANTIZE_HELP = ("weights in memory: int8 (per output row, a quarter of fp32's bytes), int4 (groups of 32, about a "
                 "sixth), none (as stored, GGUF dequantised), or auto: a GGUF file keeps its own precision (4- and "
                 "5-bit types int4, Q8_0/Q6_K int8), other models load as stored")
QUANTIZE_CHOICES = ["auto", "none", "int8", "int4"]


# The flags many verbs share, stated once: each call makes the field anew (a field belongs to one class).
def device_flag() -> Any:
    return arg("auto", DEVICE_HELP)


def quantize_flag() -> Any:
    return arg("auto", QUANTIZE_HELP, choices=QUANTIZE_CHOICES)


def jsonl_text_flag() -> Any:
    """--text-field of verbs that read text files and .jsonl."""
    return arg("text", "field holding the text in .jsonl files")


def table_text_flag() -> Any:
    """--text-field of verbs that read one text per row (.csv/.tsv/.jsonl)."""
    return arg("text", "column / field holding the text in .csv/.tsv/.jsonl files")


def dtype_flag() -> Any:
    return arg("auto", "weight precision: auto (as stored), float32, bfloat16 or float16",
               choices=["auto", "float32", "bfloat16", "float16"])


def overwrite_flag() -> Any:
    return arg(False, "replace --out if it exists")


@dataclass
class SamplingArgs(SamplingParams):
    """Sampling: how each next token is chosen"""

    device: str = device_flag()


@dataclass
class GenerateArgs(SamplingArgs):
    """Generate text from a prompt."""

    model_dir: str = arg(None, "model directory or Hugging Face checkpoint", positional=True)
    prompt: str = arg(None, "text to continue ('-' reads it from stdin)", short="-p")
    stop: list[str] = arg([], "stop when this string appears (repeatable; not included in the output; \\n and \\t "
                          "mean newline and tab)")
    truncate: str | None = arg(None, "a prompt longer than the context: left keeps its last tokens that fit "
                               "(default: refuse it)", choices=["left"])
    top_candidates: int = arg(0, "print, at each step, the K most likely next tokens and their probabilities, "
                              "and the rank of the one picked", ge=0)
    num_samples: int = arg(1, "how many completions to generate (seeds seed, seed+1, ...)", short="-n", ge=1)
    echo: bool = arg(True, "print the prompt before the completion (a decoder's; an encoder-decoder's answer is "
                     "not a continuation, so it prints alone)")
    quantize: str = quantize_flag()
    json_schema: str | None = arg(None, "a JSON Schema file: the output is JSON that validates against it (the "
                                  "grammar guarantees it, even for an untrained model)")
    regex: str | None = arg(None, "the output matches this regular expression, e.g. '[0-9]{3}-[0-9]{4}'")


@dataclass
class ChatArgs(SamplingArgs):
    """Talk to a model in the terminal, multi-turn, with the prompt format it was tuned with.
    Type /reset to start over and /exit to quit."""

    model_dir: str = arg(None, "model directory or Hugging Face checkpoint", positional=True)
    system: str | None = arg(None, "system message that sets the assistant's behaviour")
    # Chat's own defaults: longer answers, a little less random, nucleus sampling on.
    max_new_tokens: int | None = arg(256, "longest answer in tokens", ge=1)
    temperature: float = arg(0.7, "randomness (0 = greedy)", ge=0)
    top_p: float | None = arg(0.9, "nucleus sampling threshold (0 < P <= 1)", gt=0, le=1)
    quantize: str = quantize_flag()


@dataclass
class EvaluateArgs:
    """Measure a model, printing one JSON object: on text, loss / perplexity / bits per byte; on
    instruction records (.jsonl with instruction/output or messages), exact match of greedy
    answers; for a classifier on a labelled file, accuracy, macro-F1, per-class precision/recall
    and the confusion matrix; for an encoder-decoder (T5, BART) on input/target pairs, exact
    match, BLEU and chrF (sacrebleu's) of its greedy outputs."""

    model_dir: str = arg(None, "model directory", positional=True)
    data: list[str] = arg([], "text files, directories, .jsonl files, or 'pydocs'; for an encoder-decoder one "
                          ".jsonl/.csv/.tsv file of input/target pairs")
    text_field: str = jsonl_text_flag()
    batch_size: int = arg(8, "windows (an encoder-decoder: inputs) per forward pass", ge=1)
    input_column: str = arg("input", "encoder-decoder: column / field holding the input")
    target_column: str = arg("target", "encoder-decoder: column / field holding the reference output")
    max_new_tokens: int | None = arg(None, "encoder-decoder: longest output in tokens (default: twice the longest "
                                     "reference plus 16, at most the context)", ge=1)
    device: str = device_flag()
    quantize: str = quantize_flag()


@dataclass
class DemoArgs:
    """Build the pydocs corpus, train a tokenizer and a small GPT, then sample from it."""

    minutes: float = arg(4.0, "pretraining time budget", gt=0)
    out: str = arg("runs/demo", "model directory to write (replaced if it exists)")
    arch: str = arg("gpt2", "gpt2 or llama", choices=["gpt2", "llama"])
    seed: int = arg(1337, "random seed")
    device: str = device_flag()


@dataclass
class TokenizerTrainArgs:
    """Train a byte-level BPE tokenizer."""

    data: list[str] = arg(["pydocs"], "text files, directories, .jsonl files, or 'pydocs'")
    out: str = arg("tokenizer.json", "where to write tokenizer.json")
    vocab_size: int | None = arg(None, "vocabulary size (default: from the corpus size)", ge=MIN_VOCAB)
    text_field: str = jsonl_text_flag()


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
    Qwen3, BERT, Llama-style models such as SmolLM, and the encoder-decoders T5 (incl. FLAN-T5) and
    BART. A .gguf file (llama.cpp, Ollama) of the
    gpt2, llama, qwen2 or qwen3 architecture in F32, F16, BF16 or Q8_0 is read too (dequantised)."""

    hf_dir: str = arg(None, "Hugging Face model directory, or a .gguf file", positional=True)
    out: str = arg(None, "lmforge model directory to write")
    dtype: str = dtype_flag()
    overwrite: bool = overwrite_flag()


@dataclass
class ExportArgs:
    """Write a model directory as a Hugging Face checkpoint that `transformers` loads with
    AutoModelForCausalLM (an encoder-decoder: AutoModelForSeq2SeqLM)/AutoTokenizer.from_pretrained,
    or (--format gguf) as one GGUF file that llama.cpp, Ollama and LM Studio run."""

    model_dir: str = arg(None, "lmforge model directory", positional=True)
    format: str = arg("hf", "output format: hf (a directory) or gguf (one file)", choices=["hf", "gguf"])
    out: str = arg(None, "directory (hf) or file (gguf, e.g. model.gguf) to write")
    outtype: str = arg("f16", "with --format gguf: weight type f32, f16, q8_0 (8-bit blocks) or q4_0 (4-bit "
                       "blocks; embedding and output q8_0); vectors stay f32. For Q4_K_M, export f32 and run "
                       "llama.cpp's llama-quantize", choices=["f32", "f16", "q8_0", "q4_0"])
    ollama: bool = arg(False, "with --format gguf: also write an Ollama Modelfile beside the file (FROM, TEMPLATE "
                       "in Ollama's Go-template syntax, stop tokens)")
    shard_size_mb: float = arg(2000.0, "split the weights into files of at most this many MB", gt=0)
    dtype: str = dtype_flag()
    overwrite: bool = overwrite_flag()


@dataclass
class ClassifyArgs:
    """Label texts with a fine-tuned classifier."""

    model_dir: str = arg(None, "classifier model directory (from `lmforge finetune classify`)", positional=True)
    text: list[str] = arg([], "text(s) to classify")
    file: str | None = arg(None, "classify each line of this file (or each row of a .csv/.tsv/.jsonl)")
    text_field: str = table_text_flag()
    json: bool = arg(False, "print one JSON object per text: {text, label, probs}")
    device: str = device_flag()


@dataclass
class MergeLoraArgs:
    """Fold a LoRA adapter into its base model's weights: a plain model directory, no base needed."""

    model_dir: str = arg(None, "adapter directory (from fine-tuning with --lora-rank)", positional=True)
    out: str = arg(None, "model directory to write")
    overwrite: bool = overwrite_flag()


@dataclass
class EmbedArgs:
    """Sentence embeddings from an encoder: the mean of its final hidden states over the real tokens,
    L2-normalised (so a dot product is a cosine similarity). With --query, rank the texts by
    similarity to it (semantic search). `minilm` names the bundled all-MiniLM-L6-v2 model."""

    model_dir: str = arg(None, "encoder model directory, Hugging Face checkpoint, or minilm", positional=True)
    text: list[str] = arg([], "text(s) to embed")
    file: str | None = arg(None, "embed each non-empty line of this file (or the text column of a .csv/.tsv/.jsonl)")
    text_field: str = table_text_flag()
    query: str | None = arg(None, "rank the texts by cosine similarity to this query instead of printing vectors")
    top_k: int = arg(10, "with --query: how many of the best matches to show", ge=1)
    out: str | None = arg(None, "write the embeddings to FILE.npy (numpy) or FILE.json instead of stdout")
    batch_size: int = arg(32, "texts per forward pass", ge=1)
    truncate: bool = arg(True, "cut texts longer than the model reads (with a warning); --no-truncate: error")
    device: str = device_flag()


@dataclass
class FillMaskArgs:
    """Predict the masked word(s) in a text with a masked-language model (BERT-style)."""

    model_dir: str = arg(None, "masked-LM model directory or Hugging Face checkpoint", positional=True)
    text: str = arg(None, "text with [MASK] where a word is missing", positional=True)
    top_k: int = arg(5, "how many candidates to show per mask", ge=1)
    json: bool = arg(False, "print one JSON object")
    device: str = device_flag()


@dataclass
class ServeArgs:
    """Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models, /v1/embeddings for encoders), plus /health, /metrics and /tokenize. Listens on
    localhost only unless --host says otherwise."""

    model_dir: str = arg(None, "model directory or Hugging Face checkpoint", positional=True)
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network: set --api-key)")
    port: int = arg(8000, "port to listen on", ge=1, le=65535)
    api_key: str | None = arg(None, "require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, if set)")
    cors_origin: list[str] = arg([], "allow browser pages from this origin (repeatable; default: same origin only)")
    max_body: int = arg(1 << 20, "largest request body in bytes (413 above it)", ge=1)
    max_queue: int | None = arg(None, "most requests waiting for a slot; above it, 503 with Retry-After (default: 4 "
                                "per slot)", ge=1)
    slots: int | None = arg(None, "requests decoded together in one batch, each with a KV cache of the whole context "
                            "(default: as many as a quarter of the free memory holds, at most 8 per CPU core on a "
                            "CPU and 64 on a GPU)", ge=1, le=256)
    prefill_chunk: int = arg(512, "prompt tokens fed per engine step: a long prompt joins over several steps, so "
                             "the streams in flight keep decoding meanwhile (smaller: shorter stalls, slower "
                             "prefill)", ge=1, le=65536)
    prefix_cache: bool = arg(True, "reuse the keys and values of prompt starts seen before (a chat's history, "
                             "shared instructions, an agent's transcript): only the rest is computed")
    cache_mb: float | None = arg(None, "memory for the prefix cache in MiB, least recently used prefixes evicted "
                                 "first (default: a quarter of the free memory, at most 4096)", gt=0)
    name: str | None = arg(None, "model name clients use (default: the directory's name)")
    feedback: str | None = arg(None, "the chat page's compare mode appends {prompt, chosen, rejected} votes to this "
                               "JSONL file (the format `align reward` trains on); without it the mode is hidden")
    inspect: bool = arg(False, "let clients see what the model attends to: POST /inspect returns a layer's "
                        "attention weights over given tokens, logprobs entries carry token ids, and the chat page "
                        "shades the earlier tokens a reply token attended to (off by default: each inspection "
                        "pauses generation for one forward pass)")
    quantize: str = quantize_flag()
    device: str = device_flag()
