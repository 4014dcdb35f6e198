"""The training verbs' settings: `TrainConfig` (the loop, shared by every objective) and one dataclass
per verb on top of it. Torch-free, so `lmforge pretrain --help` and flag errors answer at once."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import arg
from ..text.tokenizer import MIN_VOCAB
from .rates import AT_768


def lr_help(method: str) -> str:
    """--lr's help for a fine-tuning method (a key of rates.AT_768)."""
    return (f"peak learning rate (default: from the model's width: {AT_768[method]:g} x 768/width for full "
            "fine-tuning, "
            "at most pretraining's rate at that width; 10x that for LoRA or a head alone, at most 1e-2)")


@dataclass
class TrainConfig:
    """Training loop: batch, optimiser, schedule, budget, checkpoints (shared by pretrain and finetune)"""

    batch_size: int = arg(8, "sequences per micro-batch, per process", ge=1)
    grad_accum: int = arg(1, "micro-batches accumulated into one optimizer step", ge=1)
    lr: float | None = arg(None, "peak learning rate (default: chosen from the model width)", gt=0)
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)
    schedule: str = arg("cosine", "learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) "
                        "or constant", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = arg(50, "steps of linear warmup (it ends sooner, at 10%% of the budget, in short runs)", ge=0)
    decay_fraction: float = arg(0.2, "wsd: fraction of the run spent decaying at the end", ge=0, le=1)
    optimizer: str = arg("adamw", "adamw, or muon: Muon (orthogonalised momentum) for the matrices inside the blocks, "
                         "AdamW at --lr for embeddings, output layer, norms and biases", choices=["adamw", "muon"])
    muon_lr: float = arg(0.02, "muon: peak learning rate of the hidden matrices (follows --schedule)", gt=0)
    muon_momentum: float = arg(0.95, "muon: momentum (Nesterov)", ge=0, lt=1)
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only; not biases or norms)", ge=0)
    beta1: float = arg(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = arg(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0 = off)", ge=0)
    max_steps: int | None = arg(None, "stop after this many optimizer steps", ge=1)
    max_tokens: int | None = arg(None, "stop after training on this many tokens", ge=1)
    max_minutes: float | None = arg(None, "stop after this many minutes of training", gt=0)
    epochs: float | None = arg(None, "stop after this many passes over the training data", gt=0)
    eval_every: int = arg(100, "evaluate on the validation data every N steps (and at the end)", ge=1)
    eval_batches: int = arg(20, "validation batches per evaluation, each of --batch-size windows per process", ge=1)
    save_every: int = arg(500, "write a checkpoint every N steps (and at the end, and on Ctrl-C)", ge=0)
    keep: str = arg("auto", "weights in the model directory: best (the lowest validation loss so far), last (the "
                    "last step's), or auto (best when there is validation data); state/ always holds the last "
                    "step, for --resume", choices=["auto", "best", "last"])
    log_every: int = arg(10, "log a metrics row every N steps", ge=1)
    seed: int = arg(1337, "random seed (weights init, data order, dropout, sampling)")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps, or auto")
    compile: bool = arg(False, "compile the model with torch.compile (faster steps, slower start)")
    fsdp: bool = arg(False, "under torchrun: shard weights, gradients and optimizer state across the processes "
                     "(FSDP2, per block), for models too big for one GPU; checkpoints are sharded and resume on "
                     "any number of processes")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint, exactly. Without a budget flag "
                       "it keeps the run's budget; with a different one, the rest of the LR schedule is stretched "
                       "or squeezed from where the run stands to end with the new budget")
    overwrite: bool = arg(False, "replace an existing model directory at --out")
    tensorboard: bool = arg(True, "write TensorBoard event files beside metrics.jsonl, in OUT/tb/ (view them with "
                            "`tensorboard --logdir runs/`)")


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: data, tokenizer and model shape."""

    data: list[str] = arg(["pydocs"], "training text: files, directories (recursive), .jsonl files "
                          "(one document per line), or 'pydocs' (built-in Python documentation)")
    val_data: list[str] | None = arg(None, "validation text (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.05, "share of documents held out for validation when --val-data is not given",
                              ge=0, lt=1)
    text_field: str = arg("text", "field holding the text in .jsonl files")
    out: str = arg("runs/pretrain", "model directory to write")
    tokenizer: str | None = arg(None, "use this tokenizer.json (or a directory with one) instead of training one")
    vocab_size: int | None = arg(None, "vocabulary size of a newly trained tokenizer (default: from corpus size)",
                                 ge=MIN_VOCAB)
    objective: str = arg("clm", "clm: predict the next token (decoders); mlm: predict masked tokens, BERT-style "
                         "(encoders; implies --arch bert); span: T5's span corruption (spans of the text become "
                         "sentinel tokens, the decoder writes them out) and denoise: BART's text infilling (spans "
                         "become one mask token each, the decoder writes the whole text), both on raw text for "
                         "encoder-decoders (imply --arch t5 and bart); seq2seq: learn input -> target pairs "
                         "(--data: JSONL/CSV/TSV with input and target columns) from scratch (implies --arch t5)",
                         choices=["clm", "mlm", "span", "denoise", "seq2seq"])
    arch: str = arg("gpt2", "architecture family: gpt2 (learned positions, LayerNorm, GELU), llama "
                    "(RoPE, RMSNorm, SwiGLU, grouped-query attention), bert (bidirectional encoder, for --objective "
                    "mlm), or the encoder-decoders t5 (relative position buckets, RMSNorm, gated GELU) and bart "
                    "(learned positions, post-LayerNorm), for --objective span, denoise or seq2seq",
                    choices=["gpt2", "llama", "bert", "t5", "bart"])
    mask_rate: float | None = arg(None, "share of tokens corrupted (default: mlm 0.15, of those 80%% masked, 10%% "
                                  "random, 10%% kept; span 0.15, T5's noise density; denoise 0.3, BART's)",
                                  gt=0, lt=1)
    span_length: float = arg(3.0, "span, denoise: mean length of a corrupted span in tokens (T5's mean; BART's "
                             "Poisson lambda)", ge=1)
    input_column: str = arg("input", "seq2seq: column / field holding the source text")
    target_column: str = arg("target", "seq2seq: column / field holding the target text")
    size: str = arg("auto", "model size: auto (best use of the budget), or dN = N layers of width 64*N")
    scaling_fit: str | None = arg(None, "with --size auto: size by this fit's compute-optimal rule (from `lmforge "
                                  "scaling fit`) instead of ~20 tokens per parameter")
    n_layer: int | None = arg(None, "number of transformer blocks (overrides --size; an encoder-decoder has this "
                              "many in each stack)", ge=1)
    n_embd: int | None = arg(None, "model width (overrides --size)", ge=1)
    n_head: int | None = arg(None, "attention heads (default: width / 64)", ge=1)
    n_kv_head: int | None = arg(None, "key/value heads, fewer than --n-head for grouped-query attention", ge=1)
    context_length: int = arg(256, "tokens per training sequence (the model's context window; an encoder-decoder's "
                              "longest source and longest target)", ge=1)
    dropout: float = arg(0.0, "dropout probability", ge=0, lt=1)
    optimizer: str = arg("muon", "muon: Muon (orthogonalised momentum) for the matrices inside the blocks, AdamW at "
                         "--lr for embeddings, output layer, norms and biases (reaches a given validation loss "
                         "about twice as fast here: BENCHMARKS.md); or adamw for every weight",
                         choices=["adamw", "muon"])
    muon_lr: float = arg(0.01, "muon: peak learning rate of the hidden matrices (follows --schedule)", gt=0)
    schedule: str = arg("wsd", "learning-rate schedule after warmup: wsd (warmup-stable-decay: the peak until the "
                        "last --decay-fraction, then down; reached nanoGPT's CPU figure in a quarter of its time "
                        "where cosine needed more: BENCHMARKS.md), cosine or constant",
                        choices=["cosine", "wsd", "constant"])
    qk_norm: bool = arg(False, "RMSNorm on each attention head's queries and keys (steadier at high learning rates)")
    relu2: bool = arg(False, "a plain MLP with squared-ReLU activation instead of the family's (GELU or SwiGLU)")
    untied_head: bool = arg(False, "an output layer of its own (not the embedding's transpose); it and each block's "
                            "output projections start at zero")
    logit_softcap: float | None = arg(None, "cap the logits smoothly at +-N: N * tanh(logits / N) (e.g. 15)", gt=0)


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning: base model, output, LoRA"""

    base: str = arg(None, "base model: an lmforge model directory or a Hugging Face checkpoint directory",
                    positional=True)
    out: str = arg(None, "model directory to write")
    context_length: int | None = arg(None, "longest sequence in tokens (default: the base model's context)", ge=1)
    lora_rank: int = arg(0, "LoRA rank; 0 = full fine-tuning of every (unfrozen) weight", ge=0)
    lora_alpha: float = arg(16.0, "LoRA scaling numerator: updates are scaled by alpha / rank", gt=0)
    lora_dropout: float = arg(0.0, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list[str] = arg(["attn"], "layers to adapt: attn (= attn.qkv attn.proj), mlp (= mlp.fc mlp.proj), "
                                  "all, lm_head, or any layer-name suffix")
    epochs: float | None = arg(None, "passes over the training data (default: 3, when no other budget is given)", gt=0)
    eval_every: int = arg(50, "evaluate every N steps (and at the end)", ge=1)
    save_every: int = arg(200, "write a checkpoint every N steps (and at the end, and on Ctrl-C)", ge=0)
    log_every: int = arg(5, "log a metrics row every N steps", ge=1)
    warmup_steps: int = arg(20, "steps of linear warmup (it ends sooner, at 10%% of the budget, in short runs)", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)", ge=0)


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Classification: labelled data and what to train"""

    train: str = arg(None, "training data: .csv, .tsv or .jsonl with a text and a label per row")
    val: str | None = arg(None, "validation data in the same format (default: hold out --val-fraction of --train)")
    val_fraction: float = arg(0.1, "share of rows held out for validation when --val is not given", ge=0, lt=1)
    text_field: str = arg("text", "column / field holding the text")
    label_field: str = arg("label", "column / field holding the label (any strings)")
    train_layers: str = arg("all", "what trains: all, head (the new head only), or N (the last N blocks + head)")
    class_weights: str = arg("auto", "auto: weight classes by inverse frequency (imbalanced data); none",
                             choices=["auto", "none"])
    pooling: str = arg("auto", "hidden state fed to the head: last token (decoders), cls or mean; auto picks",
                       choices=["auto", "last", "cls", "mean"])
    lr: float | None = arg(None, lr_help("classify"), gt=0)


@dataclass
class InstructConfig(FinetuneConfig):
    """Instruction tuning: data and prompt format"""

    data: str = arg(None, "training records, JSONL: {instruction, input, output} or {messages: [...]}")
    val_data: str | None = arg(None, "validation records (default: hold out --val-fraction of --data)")
    val_fraction: float = arg(0.1, "share of records held out for validation when --val-data is not given", ge=0, lt=1)
    template: str = arg("auto", "prompt format: auto (the model's own chat_template, else chatml if the tokenizer "
                        "has its tokens, else alpaca), alpaca, chatml, or model", choices=["auto", "alpaca", "chatml",
                                                                                          "model"])
    pack: bool = arg(False, "pack several examples into each sequence (faster on short examples; packed examples "
                     "can attend to earlier ones in the same row)")
    samples: int = arg(3, "validation prompts answered (greedily) and logged at each evaluation", ge=0)
    lr: float | None = arg(None, lr_help("instruct"), gt=0)



@dataclass
class Seq2SeqConfig(FinetuneConfig):
    """Sequence to sequence: input -> target pairs for an encoder-decoder (T5, BART)"""

    data: str = arg(None, "training pairs: JSONL with input and target fields, or CSV/TSV with those columns")
    val_data: str | None = arg(None, "validation pairs in the same format (default: hold out --val-fraction of "
                               "--data)")
    val_fraction: float = arg(0.1, "share of pairs held out for validation when --val-data is not given", ge=0, lt=1)
    input_column: str = arg("input", "column / field holding the source text")
    target_column: str = arg("target", "column / field holding the target text")
    lora_targets: list[str] = arg(["attn", "cross"], "layers to adapt: attn (= attn.qkv attn.proj: self-attention "
                                  "in both stacks), cross (= cross_attn.q cross_attn.kv cross_attn.proj: the "
                                  "decoder's attention to the source), mlp (= mlp.fc mlp.proj), all, lm_head, or any "
                                  "layer-name suffix")
    samples: int = arg(3, "validation sources translated (greedily) and logged at each evaluation", ge=0)
    lr: float | None = arg(None, lr_help("seq2seq"), gt=0)
