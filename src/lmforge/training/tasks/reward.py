"""`lmforge align reward`: a reward model from preferences.

The body of a language model with a scalar head on the last token (a one-output `Classifier`)
learns to give preferred answers the higher score: Bradley-Terry,
loss = -log sigmoid(r_better - r_worse - margin), optionally plus center * (r_better + r_worse)^2
to keep rewards near 0 (TRL's center_rewards_coefficient).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.runtime import Dist
from ...formats.kinds import Kind
from ...models.transformer import Classifier
from ..align_config import RewardConfig
from ..finetune import default_lr, make_saver, prepare, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir
from .preference import PreferenceTask, load_preferences


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_better - r_worse - margin) + center * (r_better + r_worse)^2."""
    loss = -F.logsigmoid(better - worse - margin)
    return loss + center * (better + worse) ** 2 if center else loss


class RewardTask(PreferenceTask):
    metric_names = ("accuracy", "margin", "mean_reward")

    def __init__(self, *args, center: float = 0.0) -> None:
        super().__init__(*args)
        self.center = center

    def pair_losses(self, r: torch.Tensor, b: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        better, worse = r[b["pairs"][:, 0]], r[b["pairs"][:, 1]]
        return bradley_terry_loss(better, worse, b["margin"], self.center), better, worse

    def loss(self, model, b) -> tuple[torch.Tensor, float, int]:
        """Mean over prompts of the mean over each prompt's pairs; weight = prompts."""
        r = model(b["ids"], b["mask"])[:, 0].float()
        losses, better, worse = self.pair_losses(r, b)
        prompts = int(b["prompts"])
        self.note(accuracy=(better > worse).float(), margin=better - worse, mean_reward=r)
        return (losses * b["pair_weight"]).sum() / prompts, prompts, int(b["mask"].sum())

    def evaluate(self, model) -> dict:
        if not self.val:
            return {}
        all_r, losses, acc, margins = [], 0.0, [], []
        device = next(model.parameters()).device
        for _, b in self.val_batches():
            b = {k: v.to(device) for k, v in b.items()}
            r = model(b["ids"], b["mask"])[:, 0].float()
            loss, better, worse = self.pair_losses(r, b)
            losses += float((loss * b["pair_weight"]).sum())
            acc.append(better > worse)
            margins.append(better - worse)
            all_r.append(r)
        r, acc, margins = torch.cat(all_r).cpu(), torch.cat(acc).float().cpu(), torch.cat(margins).cpu()
        return {"val_loss": round(losses / len(self.val), 6), "val_accuracy": round(float(acc.mean()), 4),
                "val_margin": round(float(margins.mean()), 4), "val_mean_reward": round(float(r.mean()), 4),
                "val_min_reward": round(float(r.min()), 4), "val_max_reward": round(float(r.max()), 4)}


def train_reward(cfg: RewardConfig, on_step=None) -> dict:
    return run_distributed(_train_reward, cfg, on_step)


def _train_reward(cfg: RewardConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist = ddp[0]
    cfg, body, tokenizer, base = prepare(cfg, dist)
    template, train, val = load_preferences(cfg, tokenizer, cfg.context_length, dist)
    torch.manual_seed(cfg.seed)
    model = Classifier(body.cfg, 1, "last", backbone=body)
    lora = setup_lora(model, cfg, train_also=("head.",))
    report_parameters(model, dist)
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    save = make_saver(model, tokenizer, base, lora, train_also=("head.",), kind=Kind.REWARD, pooling="last",
                      chat_template=template.to_json(), created_by="lmforge align reward")
    task = RewardTask(train, val, tokenizer.pad_id, cfg.seed, cfg.batch_size, center=cfg.center_rewards)
    cfg.lr = default_lr(cfg, "reward", body, dist)  # recorded in train_config.yaml
    return fit(model, task, cfg, Run(out, save, title=f"{out.name}: reward model"), cfg.lr, on_step=on_step, ddp=ddp)
