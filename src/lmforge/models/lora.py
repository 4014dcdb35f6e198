"""LoRA: low-rank adapters (Hu et al. 2021) on a frozen model's linear layers.

A wrapped layer computes W x + (alpha / r) * B A x with W frozen and only A [r, in] and
B [out, r] trained; B starts at zero, so training starts from the base model exactly. The
adapter is saved on its own (a small file) next to a reference to the base, and `merge`
folds B A into W for a plain model with no extra inference cost.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError

SHORTHANDS = {"attn": ["attn.qkv", "attn.proj"], "mlp": ["mlp.fc", "mlp.proj"],
              "cross": ["cross_attn.q", "cross_attn.kv", "cross_attn.proj"],  # an encoder-decoder's
              "all": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]}


class LoRALinear(nn.Linear):
    """nn.Linear with a trainable low-rank update; keeps the base parameter names (weight, bias)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # share the base's parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        if base.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)
        self.enabled = True  # False: the base layer alone (see `adapters_off`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def effective_weight(self) -> torch.Tensor:
        """W + scale * B A: the weight this layer acts with (differentiable in A and B)."""
        if not self.enabled:
            return self.weight
        return self.weight + (self.lora_b @ self.lora_a) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.effective_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone, every adapter switched off: the frozen reference of DPO and RLHF
    without a second copy of the weights in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def expand_targets(targets: list[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out.extend(SHORTHANDS.get(t, [t]))
    return out


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every linear layer whose name ends with a target; returns the wrapped layers' names.

    Targets are module-name suffixes (attn.qkv, attn.proj, mlp.fc, mlp.proj, lm_head) or the
    shorthands attn, mlp, all. A target that matches no layer is an error.
    """
    if rank <= 0:
        raise LMForgeError("--lora-rank must be positive")
    wanted = expand_targets(targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    for t in wanted:
        if not any(_matches(n, t) for n in linears):
            kinds = sorted({re.sub(r"^(backbone\.)?(blocks\.\d+\.)?", "", n) for n in linears})
            raise LMForgeError(f"--lora-targets {t!r} matches no linear layer (this model has: {', '.join(kinds)}; "
                               f"shorthands: {', '.join(SHORTHANDS)})")
    chosen = [n for n in linears if any(_matches(n, t) for t in wanted)]
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return chosen


def freeze_for_lora(model: nn.Module, train_also: tuple[str, ...] = ()) -> None:
    """Only the adapters (and parameters whose names start with `train_also`, e.g. a new head) train."""
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or name.startswith(train_also)


def adapter_state(model: nn.Module, train_also: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: LoRA matrices plus any extra trained parameters."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if ".lora_" in n or n.startswith(train_also)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain linear layers.

    An adapted output layer tied to the embedding gets its own merged matrix and the model's
    config is marked untied: folding the update into the shared matrix would change the input
    embedding too, which the adapter never did.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    for m in model.modules():
        cfg, head, wte = getattr(m, "cfg", None), getattr(m, "lm_head", None), getattr(m, "wte", None)
        if getattr(cfg, "tie_embeddings", False) and isinstance(head, nn.Linear) and isinstance(wte, nn.Embedding) \
                and head.weight is not wte.weight:
            cfg.tie_embeddings = False  # in place: the blocks hold the same config object
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
