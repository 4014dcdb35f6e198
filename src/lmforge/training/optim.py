"""Optimizers and their parameter groups: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon is PyTorch's own `torch.optim.Muon` (torch >= 2.9): momentum with Nesterov, the update
orthogonalised by 5 Newton-Schulz steps with the quintic coefficients (3.4445, -4.7750, 2.0315),
and its learning rate scaled by sqrt(max(1, rows / cols)) per matrix (Keller Jordan's recipe).
"""

from __future__ import annotations

import torch

from ..core.errors import LMForgeError
from .config import TrainConfig


def param_groups(params, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); leave biases and norm gains alone."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of each trainable parameter, once (tied weights appear once)."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The matrices inside the transformer blocks: Muon's share. Embeddings and the output layer
    are not hidden (a lookup table and a classifier want per-coordinate steps), nor are vectors."""
    return p.dim() == 2 and ".blocks." in f".{name}"


def adamw(groups: list[dict], cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    except (RuntimeError, TypeError):  # older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for the rest, driven as one optimizer: one list of
    param_groups, one step, one state_dict (AdamW's parameter indices follow Muon's).

    The loop sets each group's lr to the schedule's lr times the group's "lr_scale": Muon's group
    carries muon_lr / lr, so both follow the same warmup and decay from their own peaks."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.parts = [muon, adamw]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.parts:
            sd = opt.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        start = 0
        for opt in self.parts:
            n = len(opt.param_groups)
            groups = sd["param_groups"][start:start + n]
            ids = {i for g in groups for i in g["params"]}
            offset = min(ids, default=0)
            opt.load_state_dict({"state": {i - offset: s for i, s in sd["state"].items() if i in ids},
                                 "param_groups": [{**g, "params": [i - offset for i in g["params"]]}
                                                  for g in groups]})
            start += n


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device):
    named = trainable(model)
    if cfg.optimizer == "adamw":
        return adamw(param_groups([p for _, p in named], cfg.weight_decay), cfg, lr, device)
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    if not hidden:
        raise LMForgeError("--optimizer muon: this model has no trainable 2-D hidden matrices to give it "
                           "(use --optimizer adamw)")
    if not hasattr(torch.optim, "Muon"):
        raise LMForgeError(f"--optimizer muon needs torch >= 2.9 (this is {torch.__version__})")
    # No weight decay on Muon's matrices: its orthogonalised steps have a fixed size, so the weights'
    # norm stays bounded without it (as in Keller Jordan's and nanochat's recipes).
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=0.0, momentum=cfg.muon_momentum, nesterov=True)
    muon.param_groups[0]["lr_scale"] = cfg.muon_lr / lr
    ids = {id(p) for p in hidden}
    rest = adamw(param_groups([p for _, p in named if id(p) not in ids], cfg.weight_decay), cfg, lr, device)
    return MuonAdamW(muon, rest)
