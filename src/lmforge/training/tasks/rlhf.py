"""`lmforge align rlhf`: reinforcement learning from a reward model or a verifier, GRPO or PPO.

The rollouts and the objective are in rollout.py (GRPO's group advantages, the clipped objective,
the k3 KL penalty), PPO's value head and GAE in ppo.py; this module wires them to a run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.errors import LMForgeError
from ...core.runtime import Dist
from ...data.preferences import read_prompts
from ...text.templates import get_template
from ..align_config import RLHFConfig
from ..finetune import default_lr, make_saver, prepare, report_parameters, run_distributed, setup_lora
from ..loop import fit
from ..rundir import Run, start_run_dir
from .ppo import PolicyWithValue, PPOTask
from .rollout import RolloutTask, make_reference, reward_function, reward_model_scorer


def train_rlhf(cfg: RLHFConfig, on_step=None) -> dict:
    return run_distributed(_train_rlhf, cfg, on_step)


def _train_rlhf(cfg: RLHFConfig, ddp: tuple[Dist, torch.device], on_step) -> dict:
    dist, device = ddp
    if cfg.group_size < 2:
        raise LMForgeError("--group-size must be at least 2 (advantages compare completions of one prompt)")
    if (cfg.reward is None) == (cfg.reward_fn is None):
        raise LMForgeError("give exactly one of --reward RM_DIR and --reward-fn module:function")
    if not cfg.prompts:
        raise LMForgeError("--prompts is required (JSONL prompts to answer)")
    cfg, model, tokenizer, base = prepare(cfg, dist)
    convs = read_prompts(cfg.prompts)
    scorer = reward_function(cfg.reward_fn) if cfg.reward_fn else reward_model_scorer(cfg.reward, device)
    template = get_template(cfg.template, tokenizer)
    torch.manual_seed(cfg.seed)
    lora = setup_lora(model, cfg)
    model.to(device)
    reference = make_reference(model, lora, cfg.temperature)
    task_args = (reference, scorer, convs, tokenizer, template, cfg)  # warnings: the task's own, above the bar
    if cfg.algo == "ppo":
        trained = PolicyWithValue(model)
        task: RolloutTask = PPOTask(trained, *task_args)
    else:
        trained, task = model, RolloutTask(model, *task_args)
    if task.dropped:
        dist.say(f"warning: {task.dropped} prompt(s) dropped: no room for an answer in the context")
    task.score([0], task.rollouts([0], 1, 0.0, None))  # a reward that fails, fails before --out is touched
    report_parameters(trained, dist)
    dist.say(f"rlhf ({cfg.algo}): {len(task.prompts)} prompts, {cfg.group_size} completions each, "
             f"template {template.name}")
    out = Path(cfg.out)
    dist.on_main(start_run_dir, cfg, out)
    save_policy = make_saver(model, tokenizer, base, lora, chat_template=template.to_json(),
                             stop_token_ids=template.stop_tokens(tokenizer),
                             created_by=f"lmforge align rlhf --algo {cfg.algo}")

    def save(directory: Path, weights_file: Path | None, **extra) -> None:
        # state/'s weights are the policy's only under GRPO; with PPO's value head, write the policy afresh
        save_policy(directory, weights_file if trained is model else None, **extra)

    cfg.lr = default_lr(cfg, "rlhf", model, dist)  # recorded in train_config.yaml
    return fit(trained, task, cfg, Run(out, save, title=f"{out.name}: RLHF ({cfg.algo})"), cfg.lr,
               on_step=on_step, ddp=ddp)
