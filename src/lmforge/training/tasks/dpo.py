"""`lmforge align dpo`: direct preference optimisation (Rafailov et al. 2023), no reward model.

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)), the log-ratio
margin of the policy over the frozen starting model, the per-pair loss is
    sigmoid: -log sigmoid(beta h)                      (DPO)
    hinge:   max(0, 1 - beta h)                        (SLiC)
    ipo:     (h - 1 / (2 beta))^2, log-probs averaged per token (IPO, as TRL computes it)
The reference log-probabilities are computed once before the first step (with LoRA: the base with
its adapters switched off) and kept in DIR/reference_logps.safetensors, which --resume reads back.
Logged as TRL names them: rewards/chosen = beta (log pi - log ref) of the chosen answer, ...
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.errors import LMForgeError
from ...core.runtime import Dist, autocast
from ...data.collate import IGNORE
from ...formats.modeldir import load_weights, save_weights
from ...models.lora import adapters_off
from ..align_config import DPOConfig
from ..finetune import default_lr, make_saver, prepare, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir
from .preference import Encoded, PreferenceTask, load_preferences, preference_batch

REFERENCE_FILE = "reference_logps.safetensors"


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens [N], how many there are [N])."""
    nll = model(x, y, reduction="none")  # [N, T], 0 where y is IGNORE
    return -nll.float().sum(1), (y != IGNORE).sum(1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO loss from (summed, or for ipo per-token averaged) log-probabilities."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise LMForgeError(f"unknown DPO loss {kind!r} (choose sigmoid, ipo or hinge)")


@torch.no_grad()
def reference_logps(model: torch.nn.Module, items: list[Encoded], pad_id: int, batch_size: int) -> torch.Tensor:
    """Summed log-probabilities of every answer of `items` (in order) under the model as it is, with
    any LoRA adapters switched off: the reference of DPO."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with adapters_off(model), autocast(device):
        for i in range(0, len(items), batch_size):
            b = preference_batch(items[i:i + batch_size], pad_id)
            out.append(sequence_logps(model, b["x"].to(device), b["y"].to(device))[0].cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


class DPOTask(PreferenceTask):
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected")

    def __init__(self, train, val, pad_id, seed, batch_size, refs: dict[str, torch.Tensor], beta: float,
                 kind: str) -> None:
        super().__init__(train, val, pad_id, seed, batch_size)
        self.beta, self.kind = beta, kind
        # each prompt's slice of the flat reference tensors
        self.refs = {name: torch.split(refs[name], [len(e.seqs) for e in items])
                     for name, items in (("train", train), ("val", val)) if items}

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        idx = self.indices(first, count)
        return {**preference_batch([self.train[i] for i in idx], self.pad),
                "ref": torch.cat([self.refs["train"][i] for i in idx])}

    def pair_terms(self, model, b) -> tuple[torch.Tensor, ...]:
        """(per-pair loss, chosen rewards, rejected rewards, policy logps chosen, rejected)."""
        pi, n = sequence_logps(model, b["x"], b["y"])
        ref = b["ref"].to(pi)
        if self.kind == "ipo":  # IPO works on per-token averages
            pi, ref = pi / n.clamp(min=1), ref / n.clamp(min=1)
        c, r = b["pairs"][:, 0], b["pairs"][:, 1]
        loss = dpo_loss(pi[c], pi[r], ref[c], ref[r], self.beta, self.kind)
        chosen, rejected = self.beta * (pi[c] - ref[c]).detach(), self.beta * (pi[r] - ref[r]).detach()
        return loss, chosen, rejected, pi[c].detach(), pi[r].detach()

    def loss(self, model, b) -> tuple[torch.Tensor, float, int]:
        loss, chosen, rejected, lc, lr = self.pair_terms(model, b)
        self.note(rewards__chosen=chosen, rewards__rejected=rejected, rewards__accuracies=(chosen > rejected).float(),
                  rewards__margins=chosen - rejected, logps__chosen=lc, logps__rejected=lr)
        prompts = int(b["prompts"])
        return (loss * b["pair_weight"]).sum() / prompts, prompts, int(b["mask"].sum())

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        device = next(model.parameters()).device
        total, acc, margins = 0.0, [], []
        for i, b in self.val_batches():
            b["ref"] = torch.cat(self.refs["val"][i:i + self.batch_size])
            b = {k: v.to(device) for k, v in b.items()}
            loss, chosen, rejected, _, _ = self.pair_terms(model, b)
            total += float((loss * b["pair_weight"]).sum())
            acc.append((chosen > rejected).float().cpu())
            margins.append((chosen - rejected).cpu())
        return {"val_loss": round(total / len(self.val), 6),
                "val_rewards/accuracies": round(float(torch.cat(acc).mean()), 4),
                "val_rewards/margins": round(float(torch.cat(margins).mean()), 4)}


def load_or_compute_references(model, train: list[Encoded], val: list[Encoded], pad_id: int, cfg: DPOConfig,
                               dist: Dist) -> dict[str, torch.Tensor]:
    """A resumed run reads the reference log-probabilities it computed at its start; a new one
    computes them (rank 0, shared with the others)."""
    path = Path(cfg.out) / REFERENCE_FILE
    want = {"train": sum(len(e.seqs) for e in train), "val": sum(len(e.seqs) for e in val)}
    if cfg.resume:
        if not path.exists():
            raise LMForgeError(f"nothing to resume in {cfg.out} (no {REFERENCE_FILE})")
        refs = load_weights(path)
        if {k: len(v) for k, v in refs.items()} != want:
            raise LMForgeError(f"{path} does not match the preference data (was --data changed?)")
        return refs
    dist.say(f"reference log-probabilities of {want['train'] + want['val']} answers ...")
    return dist.on_main(lambda: {name: reference_logps(model, items, pad_id, cfg.batch_size)
                                 for name, items in (("train", train), ("val", val))})


def train_dpo(cfg: DPOConfig, on_step=None) -> dict:
    return run_distributed(_train_dpo, cfg, on_step)


def _train_dpo(cfg: DPOConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist, device = ddp
    cfg, model, tokenizer, base = prepare(cfg, dist)
    template, train, val = load_preferences(cfg, tokenizer, cfg.context_length + 1, dist)
    torch.manual_seed(cfg.seed)
    lora = setup_lora(model, cfg)
    report_parameters(model, dist)
    refs = load_or_compute_references(model.to(device), train, val, tokenizer.pad_id, cfg, dist)
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    if not cfg.resume:
        dist.on_main(save_weights, {k: v.contiguous() for k, v in refs.items()}, out / REFERENCE_FILE)
    stop = template.stop_tokens(tokenizer)
    save = make_saver(model, tokenizer, base, lora, chat_template=template.to_json(), stop_token_ids=stop,
                      created_by="lmforge align dpo")
    task = DPOTask(train, val, tokenizer.pad_id, cfg.seed, cfg.batch_size, refs, cfg.beta, cfg.loss)
    cfg.lr = default_lr(cfg, "dpo", model, dist)  # recorded in train_config.yaml
    return fit(model, task, cfg, Run(out, save, title=f"{out.name}: DPO"), cfg.lr, on_step=on_step, ddp=ddp)
