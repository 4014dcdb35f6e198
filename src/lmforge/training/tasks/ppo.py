"""`lmforge align rlhf --algo ppo`: PPO with a value head, InstructGPT's objective.

The KL penalty is folded into the rewards: every completion token earns -c * (logp - ref), with c
the batch's KL weight as in GRPO (`rlhf.kl_weight`), and the last one also the score. A value head
on the policy's hidden states estimates the return; GAE (gamma, lambda) turns rewards and values
into advantages, whitened over the micro-batch. The policy loss is the clipped ratio objective;
the value loss is clipped around the rollout's values, 0.5 max((V - R)^2, (clip(V, V_old +- c) -
R)^2), weighted by vf_coef. As in GRPO (rlhf.py), one update per batch of rollouts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...data.collate import IGNORE
from ...models.transformer import Transformer
from .rollout import RolloutTask, clipped_objective, k3_kl


class PolicyWithValue(nn.Module):
    """The policy and a scalar value head on its hidden states: (logits [B, T, V], values [B, T])."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        p = policy.wte.weight
        self.value_head = nn.Linear(policy.cfg.n_embd, 1, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self):
        return self.policy.cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.policy.hidden(x)
        return self.policy.head(h), self.value_head(h)[..., 0].float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row [N, T] (a row's
    completion is one contiguous run): (advantages, returns = advantages + values), 0 off the mask."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m, delta + gamma * lam * running, torch.zeros_like(running))
        next_value = torch.where(m, values[:, t], torch.zeros_like(next_value))
        adv[:, t] = running
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries."""
    v = x[mask]
    return ((x - v.mean()) / (v.std() + 1e-8)) * mask


def policy_logps(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token log-probabilities [N, T], entropies [N, T], values [N, T]) from PolicyWithValue's output."""
    logits, values = out
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != IGNORE)
    return logp, -(logp_all.exp() * logp_all).sum(-1), values


class PPOTask(RolloutTask):
    metric_names = (*RolloutTask.metric_names, "value_loss")

    def __init__(self, model: PolicyWithValue, *args, **kw) -> None:
        super().__init__(model.policy, *args, **kw)
        self.model = model

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ks = list(range(first, first + count))
        items = [self.order(k) for k in ks]
        completions = self.rollouts(items, cfg.group_size, cfg.temperature, [cfg.seed + k * cfg.group_size for k in ks])
        scores = self.score(items, completions).view(-1)
        b = self.sequences(items, completions)
        b["ref"] = self.reference(b["x"], b["y"])
        mask = b["y"] != IGNORE
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logp, _, values = policy_logps(self.model(b["x"].to(device)), b["y"].to(device), cfg.temperature)
        logp, values = logp.cpu(), values.cpu() * mask
        coef, reward_weight = self.kl_control(k3_kl(logp, b["ref"])[mask])  # as in GRPO (RolloutTask)
        rewards = -coef * (logp - b["ref"]) * mask  # the KL penalty, per token (k1, InstructGPT)
        last = mask.long().cumsum(1).argmax(1)  # each row's last completion token
        rewards[torch.arange(len(last)), last] += reward_weight * scores
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        b.update(advantages=whiten(adv, mask), returns=returns, old_values=values, old_logps=logp)
        self.check_rollouts(scores.view(count, -1), completions)
        return b

    def loss(self, model, b) -> tuple[torch.Tensor, float, int]:
        cfg, mask = self.cfg, b["y"] != IGNORE
        logp, entropy, values = policy_logps(model(b["x"]), b["y"], cfg.temperature)
        pg, clipped = clipped_objective(logp, b["old_logps"], b["advantages"], cfg.clip)
        v_clipped = b["old_values"] + (values - b["old_values"]).clamp(-cfg.value_clip, cfg.value_clip)
        vf = 0.5 * torch.max((values - b["returns"]) ** 2, (v_clipped - b["returns"]) ** 2)
        n = mask.sum()
        self.note(kl=k3_kl(logp.detach(), b["ref"])[mask], entropy=entropy.detach()[mask], clip_ratio=clipped[mask],
                  value_loss=vf.detach()[mask])
        per_token = (pg + cfg.vf_coef * vf) * mask
        return per_token.sum() / n.clamp(min=1), float(n), int((b["x"] != self.tokenizer.pad_id).sum())
