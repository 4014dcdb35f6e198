"""`lmforge pretrain`: raw text -> tokenizer -> token data -> model -> trained model directory."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.config import explicit_keys
from ..core.errors import LMForgeError
from ..core.runtime import Dist, distributed
from ..data.tokens import prepare
from ..formats.kinds import Kind
from ..formats.modeldir import check_vocab, read_config, save_model_dir
from ..models.config import ModelConfig
from ..models.sizing import (
    arch_config,
    choose_depth,
    depth_of,
    fit_mismatch,
    fitted_tokens_per_param,
    measure_step_seconds,
    passes_warning,
    sized_config,
)
from ..models.transformer import Transformer
from ..text.corpus import Corpus, _cache_dir, load_corpus
from ..text.tokenizer import Tokenizer, auto_vocab_size
from .config import PretrainConfig
from .loop import fit
from .rates import pretrain_lr
from .rundir import Run, check_out, resume_config, start_run_dir
from .schedule import check_budget
from .sharded import check_fsdp
from .tasks.lm import LMTask, MLMTask
from .tasks.seq2seq import DEFAULT_RATE, NoisingTask, make_noise, pairs_task, read_pair_split, text_length


def padded_vocab(n: int) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64 (faster matmuls)."""
    return 64 * math.ceil(n / 64)


def get_tokenizer(cfg: PretrainConfig, corpus: Corpus, out: Path, dist_info: Dist) -> Tokenizer:
    """The run's tokenizer: --tokenizer, or one trained on the corpus (cached); for span corruption
    with T5's sentinel tokens added. A resumed run's own."""
    if cfg.resume:
        tok = Tokenizer.from_file(out / "tokenizer.json")
        given = cfg.tokenizer and Path(cfg.tokenizer).exists() and Tokenizer.from_file(cfg.tokenizer)
        if given and _for_objective(cfg, given).to_str() != tok.to_str():
            raise LMForgeError(f"--resume: {cfg.tokenizer} is not the tokenizer the run in {out} was trained with")
        return tok
    if cfg.tokenizer:
        return _for_objective(cfg, Tokenizer.from_file(cfg.tokenizer))
    vocab = cfg.vocab_size or auto_vocab_size(corpus.num_bytes)
    key = hashlib.sha256(f"{corpus.fingerprint()}|{vocab}|v1".encode()).hexdigest()[:16]
    cached = _cache_dir() / "tokenizers" / f"{key}.json"
    with dist_info.main_first():
        if not cached.exists():
            dist_info.say(f"training a byte-level BPE tokenizer: {vocab} tokens on {corpus.num_bytes / 1e6:.1f} MB")
            Tokenizer.train(corpus.documents, vocab, show_progress=sys.stderr.isatty()).save(cached)
    return _for_objective(cfg, Tokenizer.from_file(cached))


def _for_objective(cfg: PretrainConfig, tokenizer: Tokenizer) -> Tokenizer:
    return tokenizer.with_sentinels() if cfg.objective == "span" else tokenizer


ENCODER_DECODERS = ("t5", "bart")
DEFAULT_ARCH = {"mlm": "bert", "span": "t5", "denoise": "bart", "seq2seq": "t5"}


def check_objective(cfg: PretrainConfig) -> None:
    """Pair the objective with an architecture that can learn it: the objective's own family when
    --arch was left at its default (gpt2), else a one-line error for a mismatch. Sets the
    objective's default --mask-rate."""
    given = explicit_keys(cfg)
    arch_given = "arch" in given if given is not None else cfg.arch != "gpt2"
    if not arch_given and cfg.objective in DEFAULT_ARCH:
        cfg.arch = DEFAULT_ARCH[cfg.objective]
    seq2seq = cfg.objective in ("span", "denoise", "seq2seq")
    if seq2seq and cfg.arch not in ENCODER_DECODERS:
        raise LMForgeError(f"--objective {cfg.objective} trains an encoder-decoder; --arch {cfg.arch} has no "
                           "encoder-decoder layout: use --arch t5 or bart")
    if not seq2seq and cfg.arch in ENCODER_DECODERS:
        raise LMForgeError(f"--arch {cfg.arch} is an encoder-decoder: use --objective span, denoise or seq2seq")
    if (cfg.objective == "mlm") != (cfg.arch == "bert"):
        raise LMForgeError("--arch bert goes with --objective mlm (a bidirectional encoder), gpt2/llama with clm")
    if cfg.mask_rate is None and cfg.objective in DEFAULT_RATE:
        cfg.mask_rate = DEFAULT_RATE[cfg.objective]


def build_model_config(cfg: PretrainConfig, vocab: int, out: Path, tokens_per_step: int, train_tokens: int,
                       dist_info: Dist, device: torch.device) -> ModelConfig:
    if cfg.resume and (out / "config.json").exists():
        return ModelConfig.from_dict(read_config(out)["model"])
    # (A run killed between its first state/ and its first model directory has no config.json: its
    # shape is in train_config.yaml, which resume_config has read, and is rebuilt from it below.)
    explicit = cfg.n_layer is not None and cfg.n_embd is not None
    if explicit:
        depth = None
    elif cfg.size == "auto":
        max_tokens = planned_tokens(cfg, tokens_per_step, train_tokens)
        seconds = cfg.max_minutes * 60 if cfg.max_minutes else None
        if max_tokens is None and seconds is None:
            raise LMForgeError("--size auto needs a budget: --max-steps, --max-tokens, --max-minutes or --epochs")
        depth, report = dist_info.on_main(  # measured once, on rank 0; the others take its choice
            choose_depth, cfg.arch, vocab, cfg.context_length, tokens_per_step, max_tokens=max_tokens,
            seconds=seconds, step_seconds=lambda c: measure_step_seconds(c, cfg.batch_size, device),
            unique_tokens=train_tokens,
            tokens_per_param=fitted_tokens_per_param(cfg.scaling_fit) if cfg.scaling_fit else None)
        for line in report:
            dist_info.say(f"size auto: {line}")
        mismatch = fit_mismatch(cfg.scaling_fit, vocab, cfg.context_length) if cfg.scaling_fit else None
        if mismatch:
            dist_info.say(f"warning: {mismatch}")
    else:
        depth = depth_of(cfg.size)
    base = sized_config(cfg.arch, depth, vocab, cfg.context_length) if depth else None
    n_layer = cfg.n_layer or base.n_layer
    n_embd = cfg.n_embd or base.n_embd
    n_head = cfg.n_head or (base.n_head if base and base.n_embd == n_embd else None)
    if depth:
        cfg.size = f"d{depth}"
    return arch_config(cfg.arch, vocab, cfg.context_length, n_layer, n_embd, n_head, cfg.n_kv_head, cfg.dropout,
                       model_options(cfg))


def model_options(cfg: PretrainConfig) -> dict:
    """The ModelConfig fields set by the architecture flags (the family's own values elsewhere)."""
    options: dict = {}
    if cfg.qk_norm:
        options["qk_norm"] = True
    if cfg.relu2:
        options.update(mlp="plain", activation="relu2")
    if cfg.untied_head:
        options.update(tie_embeddings=False, zero_init=True)
    if cfg.logit_softcap:
        options["logit_softcap"] = cfg.logit_softcap
    return options


def planned_tokens(cfg: PretrainConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    """Training tokens the step, token and epoch budgets allow (the smallest), None for time alone."""
    budgets = [cfg.max_tokens, cfg.max_steps and cfg.max_steps * tokens_per_step,
               cfg.epochs and int(cfg.epochs * train_tokens)]
    return min((b for b in budgets if b), default=None)


def pretrain(cfg: PretrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Run pretraining as configured; returns the trainer record with the final metrics (see `fit`)."""
    with distributed(cfg.device) as (dist_info, device), dist_info.quiet():
        return _pretrain(cfg, dist_info, device, on_step)


def _pretrain(cfg: PretrainConfig, dist_info: Dist, device: torch.device, on_step) -> dict:
    out = Path(cfg.out)
    if cfg.fsdp:
        check_fsdp(dist_info)
    if cfg.resume:
        cfg = resume_config(cfg, out)
    else:
        dist_info.on_main(check_out, out, cfg.overwrite)  # fail early, before any work, if --out is taken
    check_budget(cfg)  # before sizing, which divides by the budget
    check_objective(cfg)
    pairs = None
    if cfg.objective == "seq2seq":
        pairs = read_pair_split(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, cfg.input_column,
                                cfg.target_column)
        corpus = Corpus([*pairs[0][0], *pairs[0][1]], files=len(cfg.data))  # the tokenizer learns both sides
        val_corpus = None
    else:
        corpus = load_corpus(cfg.data, cfg.text_field)
        val_corpus = load_corpus(cfg.val_data, cfg.text_field) if cfg.val_data else None
    dist_info.say(f"data: {corpus.describe()}")
    tokenizer = get_tokenizer(cfg, corpus, out, dist_info)
    if pairs is None:
        with dist_info.main_first():
            data = prepare(corpus, tokenizer, val_corpus, cfg.val_fraction)
        train_tokens = len(data.train)
        example_tokens = cfg.context_length
        if cfg.objective in ("span", "denoise"):
            example_tokens = text_length(cfg.objective, cfg.context_length, cfg.mask_rate, cfg.span_length)
    else:  # a pair's tokens, source and target: what a step reads, for sizing and budgets
        train_tokens = sum(len(ids) for ids in tokenizer.encode_batch(corpus.documents)) + len(corpus.documents)
        example_tokens = max(1, round(2 * train_tokens / len(corpus.documents)))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist_info.world * example_tokens
    sized_by_rule = cfg.size == "auto" and None in (cfg.n_layer, cfg.n_embd) and not cfg.resume  # it warns itself
    mcfg = build_model_config(cfg, padded_vocab(tokenizer.vocab_size), out, tokens_per_step, train_tokens,
                              dist_info, device)
    if mcfg.is_encoder_decoder:  # the family's first decoder input: T5's is padding, BART's end-of-text
        mcfg.decoder_start_token_id = tokenizer.pad_id if cfg.arch == "t5" else tokenizer.eot_id
    check_vocab(tokenizer, mcfg, str(out))
    cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head = mcfg.n_layer, mcfg.n_embd, mcfg.n_head, mcfg.n_kv_head
    cfg.vocab_size = cfg.vocab_size or (None if cfg.tokenizer else tokenizer.vocab_size)
    lr = cfg.lr = cfg.lr or pretrain_lr(mcfg.n_embd, cfg.arch)

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    # --eval-batches counts batches of every process together: the same windows whatever their number
    eval_windows = cfg.eval_batches * cfg.batch_size * dist_info.world
    if cfg.objective == "mlm":
        task = MLMTask(data, mcfg.context_length, cfg.seed, tokenizer, cfg.mask_rate, eval_windows, cfg.batch_size,
                       dist_info)
    elif cfg.objective in ("span", "denoise"):
        task = NoisingTask(data, example_tokens, cfg.seed,
                           make_noise(cfg.objective, tokenizer, cfg.mask_rate, cfg.span_length), tokenizer.pad_id,
                           mcfg.decoder_start_token_id, eval_windows, cfg.batch_size, dist_info)
    elif cfg.objective == "seq2seq":
        task = pairs_task(cfg, tokenizer, mcfg.decoder_start_token_id, *pairs, mcfg.context_length, dist_info)
    else:
        task = LMTask(data, mcfg.context_length, cfg.seed, tokenizer.token_bytes(), eval_windows, cfg.batch_size,
                      dist_info)
    layers = f"{mcfg.n_layer} + {mcfg.n_decoder_layer} layers (encoder + decoder)" if mcfg.is_encoder_decoder \
        else f"{mcfg.n_layer} layers"
    dist_info.say(f"model: {cfg.arch} {layers} x {mcfg.n_embd} wide, {mcfg.n_head} heads "
                  f"({mcfg.n_kv_head} k/v), context {mcfg.context_length}, vocab {mcfg.vocab_size}: "
                  f"{model.num_params() / 1e6:.2f}M parameters; {train_tokens:,} training tokens; "
                  f"{tokens_per_step:,} tokens/step; lr {lr:g}"
                  + (f" (Muon {cfg.muon_lr:g})" if cfg.optimizer == "muon" else "") + f"; {device}"
                  + (f" x {dist_info.world} processes" if dist_info.world > 1 else ""))
    planned = planned_tokens(cfg, tokens_per_step, train_tokens)
    warning = None if cfg.resume or sized_by_rule or not planned else passes_warning(planned, train_tokens)
    if warning:
        dist_info.say(f"warning: {warning}")
    dist_info.on_main(start_run_dir, cfg, out)  # only now, with every input checked, touch --out
    if not cfg.resume:  # before any checkpoint: a run killed in its first save can still be resumed
        dist_info.on_main(tokenizer.save, out / "tokenizer.json")
    kind = {"clm": Kind.CAUSAL_LM, "mlm": Kind.MASKED_LM}.get(cfg.objective, Kind.SEQ2SEQ)
    run = Run(out, lambda d, w, **extra: save_model_dir(d, model, tokenizer, w, kind=kind, **extra,
                                                        created_by="lmforge pretrain"),
              title=f"{out.name}: {cfg.arch} d{mcfg.n_layer}")
    return fit(model, task, cfg, run, lr, on_step=on_step, ddp=(dist_info, device))
