"""Optimizers and their parameter groups."""

from __future__ import annotations

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); leave biases and norm gains alone."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device):
    groups = param_groups(model, cfg.weight_decay)
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    except (RuntimeError, TypeError):  # older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))

