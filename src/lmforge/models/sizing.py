"""Model sizes: one dial (depth) that derives the rest, and `--size auto`.

`dN` means N layers of width 64*N with 64-dimensional heads (the nanochat recipe: a single dial
that keeps the shape sensible). `auto` picks the depth that makes the best use of the budget by
the compute-optimal rule (about 20 training tokens per parameter, Hoffmann et al. 2022), using
the throughput measured on this machine for time budgets. Tokens seen again in a later pass are
worth less than new ones, so the rule counts *effective* tokens (Muennighoff et al. 2023,
data-constrained scaling): after about 4 passes repetition buys little, and a small corpus
with a long budget is better spent on a bigger model (or a shorter run) than on more passes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import torch

from ..core.errors import LMForgeError
from .config import ModelConfig, flops_per_token
from .transformer import Transformer

TOKENS_PER_PARAM = 20
MAX_DEPTH = 32
REPEAT_DECAY = 15.4  # R*_D of Muennighoff et al. 2023: repeated tokens' value decays on this scale
USEFUL_PASSES = 4  # up to here, repeated data is nearly as good as new (ibid.); beyond it, warn


def effective_tokens(tokens: float, unique: float | None) -> float:
    """Training tokens discounted for repetition: U + U * R* * (1 - exp(-R / R*)), with R the
    passes beyond the first over `unique` tokens (Muennighoff et al. 2023, eq. 5)."""
    if not unique or tokens <= unique:
        return tokens
    repeats = tokens / unique - 1
    return unique * (1 + REPEAT_DECAY * (1 - math.exp(-repeats / REPEAT_DECAY)))


def passes_warning(tokens: float, unique: float) -> str | None:
    """A warning when a budget implies many passes over the data, else None."""
    passes = tokens / max(unique, 1)
    if passes <= USEFUL_PASSES:
        return None
    return (f"the budget means {passes:.1f} passes over {unique:,.0f} training tokens; beyond about "
            f"{USEFUL_PASSES} passes each repeat adds less (more text would do better; watch val_loss for "
            "memorisation)")


def arch_config(arch: str, vocab_size: int, context_length: int, n_layer: int, n_embd: int,
                n_head: int | None = None, n_kv_head: int | None = None, dropout: float = 0.0,
                options: dict | None = None) -> ModelConfig:
    """GPT-2, Llama, BERT, T5 or BART layout at a given shape (T5 and BART: n_layer blocks per
    stack); `options` are further ModelConfig fields (qk_norm, zero_init, logit_softcap, ...) that
    override the family's."""
    n_head = n_head or max(1, n_embd // 64)
    common = dict(vocab_size=vocab_size, context_length=context_length, n_layer=n_layer, n_embd=n_embd,
                  n_head=n_head, dropout=dropout)
    if options:
        base = arch_config(arch, vocab_size, context_length, n_layer, n_embd, n_head, n_kv_head, dropout)
        fields = {**base.to_dict(), "intermediate_size": None, **options}
        return ModelConfig(**fields)
    if arch == "gpt2":
        return ModelConfig(**common, n_kv_head=n_kv_head, norm="layernorm", mlp="plain", activation="gelu",
                           pos_embedding="learned", bias=True, tie_embeddings=True)
    if arch == "llama":
        if n_kv_head is None:  # grouped-query attention, 2 query heads per k/v head, when it divides
            n_kv_head = n_head // 2 if n_head % 2 == 0 and n_head >= 4 else n_head
        return ModelConfig(**common, n_kv_head=n_kv_head, norm="rmsnorm", norm_eps=1e-5, mlp="gated",
                           activation="silu", pos_embedding="rope", bias=False, tie_embeddings=False)
    if arch == "bert":  # bidirectional encoder for masked-token prediction, BERT's post-norm layout
        return ModelConfig(**common, n_kv_head=n_kv_head, norm="layernorm", norm_eps=1e-12, mlp="plain",
                           activation="gelu", pos_embedding="learned", bias=True, tie_embeddings=True, causal=False,
                           norm_position="post", type_vocab_size=2, embedding_norm=True, head_transform=True,
                           lm_head_bias=True)
    # Encoder-decoders: n_layer blocks in each stack. The decoder starts from token 0 until the
    # caller sets the tokenizer's (pretrain does: T5's pad, BART's end-of-text).
    if arch == "t5":  # T5's layout (v1.1's gated GELU, v1.0's tied output layer): relative position buckets,
        #             RMSNorm, no biases, unscaled attention
        return ModelConfig(**common, n_kv_head=n_kv_head, n_decoder_layer=n_layer, norm="rmsnorm", norm_eps=1e-6,
                           mlp="gated", activation="gelu_tanh", pos_embedding="relative", bias=False, attn_scale=1.0,
                           tie_embeddings=True, head_scale=n_embd ** -0.5, decoder_start_token_id=0)
    if arch == "bart":  # BART's: learned positions from row 2, post-norm LayerNorm, GELU, biases
        return ModelConfig(**common, n_kv_head=n_kv_head, n_decoder_layer=n_layer, norm="layernorm", mlp="plain",
                           activation="gelu", pos_embedding="learned", pos_offset=2, bias=True, norm_position="post",
                           embedding_norm=True, lm_head_bias=True, tie_embeddings=True, decoder_start_token_id=0)
    raise LMForgeError(f"unknown --arch {arch!r} (choose gpt2, llama, bert, t5 or bart)")


def depth_of(size: str) -> int:
    m = re.fullmatch(r"d(\d+)", size)
    if not m or not 1 <= int(m.group(1)) <= MAX_DEPTH:
        raise LMForgeError(f"unknown --size {size!r}: use auto, or d1 .. d{MAX_DEPTH} "
                           "(N layers of width 64*N)")
    return int(m.group(1))


def sized_config(arch: str, depth: int, vocab_size: int, context_length: int, dropout: float = 0.0) -> ModelConfig:
    return arch_config(arch, vocab_size, context_length, depth, 64 * depth, dropout=dropout)


def trained_params(cfg: ModelConfig) -> float:
    """Parameters that cost compute per token: all weights but the input embedding lookup."""
    return (flops_per_token(cfg) - 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.context_length) / 6


def measure_step_seconds(cfg: ModelConfig, batch_size: int, device: torch.device, steps: int = 2) -> float:
    """Seconds per training step (forward, backward, AdamW) at this shape, after one warm-up step."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), device=device)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def fitted_tokens_per_param(path: str) -> Callable[[float], float]:
    """The compute-optimal tokens per parameter at budget C by a fit from `lmforge scaling fit`:
    N_opt = G (C/6)^a, D_opt = C / (6 N_opt), so D_opt / N_opt = (C/6)^(1-2a) / G^2."""
    import json

    try:
        rule = json.loads(open(path).read())["compute_optimal"]
        g, a = float(rule["G"]), float(rule["n_opt_exponent"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LMForgeError(f"--scaling-fit {path} is not a fit from `lmforge scaling fit`") from None
    return lambda c: (c / 6) ** (1 - 2 * a) / g ** 2


def fit_mismatch(path: str, vocab_size: int, context_length: int) -> str | None:
    """A warning when the fit's runs had another vocabulary or context than this run (its loss
    curves, and so the compute-optimal ratio, depend on both), or None."""
    import json

    seen = json.loads(open(path).read()).get("trained_on") or {}
    differ = [f"{what} {theirs} (this run: {ours})" for what, theirs, ours in
              (("vocabulary", seen.get("vocab_size"), vocab_size), ("context", seen.get("context_length"),
                                                                    context_length))
              if theirs is not None and theirs != ours]
    if not differ:
        return None
    return (f"--scaling-fit {path} was fitted on runs with {' and '.join(differ)}; its compute-optimal ratio "
            "may not carry over (sweep with this run's settings to be sure)")


def choose_depth(arch: str, vocab_size: int, context_length: int, tokens_per_step: int, *,
                 max_tokens: float | None, seconds: float | None,
                 step_seconds: Callable[[ModelConfig], float],
                 unique_tokens: float | None = None,
                 tokens_per_param: Callable[[float], float] | None = None) -> tuple[int, list[str]]:
    """The depth whose effective tokens per parameter, under the budget, is closest to the optimum
    (`unique_tokens`: the size of the training data, to discount repeated passes).

    With a token budget the answer follows directly. With a time budget, throughput is measured
    on a probe model; the probe moves to the chosen size until the choice stops changing, since
    small models use the machine less efficiently than big ones. `tokens_per_param(C)`: the
    optimal ratio at compute C (a fitted scaling law), instead of the fixed ~20.
    """
    ratio = tokens_per_param or (lambda c: TOKENS_PER_PARAM)
    if (max_tokens is not None and max_tokens <= 0) or (seconds is not None and seconds <= 0):
        raise LMForgeError("--size auto needs a positive budget")
    cfgs = {d: sized_config(arch, d, vocab_size, context_length) for d in range(1, MAX_DEPTH + 1)}
    report: list[str] = []

    def pick(tokens_of: Callable[[int], float]) -> int:
        def distance(d: int) -> float:
            useful = effective_tokens(tokens_of(d), unique_tokens)
            n = trained_params(cfgs[d])
            return abs(math.log(useful / (ratio(6 * n * useful) * n)))

        return min(cfgs, key=distance)

    if seconds is None:
        assert max_tokens is not None
        depth = pick(lambda d: max_tokens)
        report.append(f"budget {max_tokens:,.0f} tokens")
    else:
        rates: dict[int, float] = {}  # depth -> achieved FLOP/s
        depth = 4
        for _ in range(4):
            if depth in rates:
                break
            sec = step_seconds(cfgs[depth])
            rates[depth] = flops_per_token(cfgs[depth]) * tokens_per_step / sec
            report.append(f"probe d{depth}: {tokens_per_step / sec:,.0f} tokens/s "
                          f"({rates[depth] / 1e9:.1f} GFLOP/s)")

            def tokens_of(d: int) -> float:
                nearest = min(rates, key=lambda r: abs(r - d))
                return rates[nearest] * seconds / flops_per_token(cfgs[d])

            depth = pick(tokens_of)
            if max_tokens is not None:  # both budgets: whichever binds first
                depth = min(depth, pick(lambda d: max_tokens))
        nearest = min(rates, key=lambda r: abs(r - depth))
        tokens = rates[nearest] * seconds / flops_per_token(cfgs[depth])
        if max_tokens is not None:
            tokens = min(tokens, max_tokens)
        report.append(f"budget {seconds / 60:.1f} min ~ {tokens:,.0f} tokens at d{depth}")
        max_tokens = tokens
    n = trained_params(cfgs[depth])
    useful = effective_tokens(max_tokens, unique_tokens)
    worth = f", worth {useful / n:.0f} new ones" if useful < max_tokens else ""
    report.append(f"chose d{depth}: {cfgs[depth].n_layer} layers, width {cfgs[depth].n_embd}, "
                  f"{cfgs[depth].n_head} heads, {n / 1e6:.2f}M parameters -> "
                  f"{max_tokens / n:.0f} tokens per parameter{worth} (compute-optimal is ~{ratio(6 * n * useful):.0f}"
                  f"{' by the scaling fit' if tokens_per_param else ''})")
    warning = unique_tokens and passes_warning(max_tokens, unique_tokens)
    if warning:
        report.append(f"warning: {warning}")
    return depth, report
