"""Rollouts and their objective for `lmforge align rlhf` (GRPO here; PPO's value head and GAE: ppo.py;
the training entry point: rlhf.py).

Each step samples G completions per prompt through the inference engine (n samples share one
prefill), scores them, and updates the policy on its own samples once:
    advantage  A = r - mean of the group                  (Dr. GRPO: Liu et al. 2025, "Understanding
               R1-Zero-Like Training"; --scale-rewards group also divides by the group's std + 1e-4,
               as GRPO (Shao et al. 2024) and TRL's default do)
    objective  min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) per completion token
    penalty    c * k3, k3 = exp(ref - logp) - (ref - logp) - 1 per token (Schulman's estimator),
               c = kl_coef * max(1, KL / kl_target) for the batch's mean per-token KL; a batch whose
               KL passes --max-kl keeps the penalty alone (it only pulls the policy back)
averaged over all completion tokens of the global batch (token-level aggregation). With one update
per batch of rollouts (TRL's default num_iterations=1) the ratio is 1 when the gradient is taken:
its gradient is the policy gradient, and clip_ratio logs 0, as TRL's does. Log-probabilities use
the sampling temperature, as TRL's do. The reference is the starting model: the base with its
adapters off under LoRA, else a frozen copy.

Why no std by default: a weak policy sampled hot writes answers a reward model scores nearly alike;
dividing by their tiny spread turns that noise into unit-sized advantages, and the policy collapses
(reported: answers shrinking from 6 tokens to 2 as the per-token KL rose to 4.6; on make_align_data's
shape task, KL peaks up to 4.7 and garbled answers: BENCHMARKS.md). Without it, a group with
(nearly) equal rewards carries (nearly) no signal, as it should. The KL weight grows in proportion
above --kl-target (InstructGPT's and TRL's adaptive KL, without state, so resume stays exact).
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from ...core.errors import LMForgeError
from ...data.collate import IGNORE, collate
from ...data.tokens import EpochOrder
from ...formats.load import load_model
from ...inference.engine import Engine, Request
from ...inference.reward import check_reward_model, score_answers
from ...models.lora import adapters_off
from ...text.templates import Template, encode_segments, user_text
from ...text.tokenizer import Tokenizer
from ..align_config import RLHFConfig
from ..metrics import TaskMetrics

Scorer = Callable[[list[list[dict]], list[str]], list[float]]
OPENING = 8  # rewards: the first batches' (at least this many) show a reward that never varies


# -- the formulas ---------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Each reward [P, G] minus its group's mean (Dr. GRPO); `scale`: also in group standard
    deviations (GRPO as published)."""
    centered = rewards - rewards.mean(1, keepdim=True)
    return centered / (rewards.std(1, keepdim=True) + eps) if scale else centered


def kl_weight(kl_coef: float, kl: float, target: float | None) -> float:
    """The KL penalty's weight for a batch whose mean per-token KL is `kl`: kl_coef up to `target`,
    then growing in proportion (a stateless take on InstructGPT's adaptive coefficient)."""
    return kl_coef * max(1.0, kl / target) if target else kl_coef


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1 with d = ref - logp: unbiased, >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), and where clipping bit."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def token_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token [N, T] (0 where ignored), entropy at each position [N, T])
    under the model's distribution at `temperature`."""
    logits = model(x).float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * (y != IGNORE), entropy


# -- rewards ----------------------------------------------------------------------------------------

def reward_function(spec: str) -> Scorer:
    """`module:function(prompt, completion) -> float` as a scorer; import errors and non-numbers are
    one-line errors."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise LMForgeError(f"--reward-fn {spec!r}: expected module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` would have it
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise LMForgeError(f"--reward-fn {spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise LMForgeError(f"--reward-fn {spec}: not a function")

    def score(convs: list[list[dict]], completions: list[str]) -> list[float]:
        out = []
        for conv, completion in zip(convs, completions):
            value = fn(user_text(conv[-1]), completion)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LMForgeError(f"--reward-fn {spec} returned {value!r}, not a finite number")
            out.append(float(value))
        return out

    return score


def reward_model_scorer(path: str, device: torch.device) -> Scorer:
    rm = load_model(path, device=str(device))
    check_reward_model(rm)
    rm.model.requires_grad_(False)
    return lambda convs, completions: score_answers(rm, convs, completions)


# -- the task ---------------------------------------------------------------------------------------

class RolloutTask(TaskMetrics):
    """Batches are fresh rollouts of the current policy: sample k of the stream is seeded by k, so a
    resumed run (same weights, same k) draws the same completions."""

    metric_names = ("reward", "reward_std", "kl", "kl_coef", "kl_limited", "entropy", "completions/mean_length",
                    "clip_ratio")

    def __init__(self, policy: torch.nn.Module, reference: Callable, scorer: Scorer, convs: list[list[dict]],
                 tokenizer: Tokenizer, template: Template, cfg: RLHFConfig,
                 say: Callable[[str], None] | None = None) -> None:
        self.policy, self.reference, self.scorer, self.cfg = policy, reference, scorer, cfg
        # warnings on stderr (stdout is for results), each a line of its own above the progress bar (ranks
        # but the first are quiet under torchrun)
        self.say = say or (lambda message: tqdm.write(message, file=sys.stderr))
        self.warned: set[str] = set()
        self.flat_batches = 0
        self.opening: list[float] | None = []  # the first rewards, until there are OPENING of them
        self.tokenizer, self.template = tokenizer, template
        self.stop = template.stop_tokens(tokenizer)
        self.end = end_of_turn(tokenizer, template)
        ctx = policy.cfg.context_length
        self.convs, self.prompts, dropped = [], [], 0
        for conv in convs:
            ids, _ = encode_segments(tokenizer, template.render(conv, tokenizer, add_generation_prompt=True))
            if len(ids) + 2 > ctx:
                dropped += 1
                continue
            self.convs.append(conv)
            self.prompts.append(ids)
        if not self.prompts:
            raise LMForgeError(f"no prompt leaves room for an answer within the context of {ctx} tokens")
        self.dropped = dropped
        self.order = EpochOrder(len(self.prompts), cfg.seed)
        self.windows_per_epoch = len(self.prompts)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.policy, slots=max(self.cfg.slots, self.cfg.group_size))
        return self._engine

    def rollouts(self, items: list[int], n: int, temperature: float, seeds: list[int] | None) -> list[list]:
        """n sampled completions (token lists, ending with the end-of-turn token when they stopped)
        per prompt index, drawn by the engine from the policy in eval mode."""
        ctx = self.policy.cfg.context_length
        requests = [Request(self.prompts[i], max_tokens=min(self.cfg.max_new_tokens, ctx - len(self.prompts[i]) - 1),
                            temperature=temperature, seed=None if seeds is None else seeds[j], stop=self.stop, n=n)
                    for j, i in enumerate(items)]
        was_training = self.policy.training
        self.policy.eval()
        try:
            results = self.engine.generate(requests)
        finally:
            self.policy.train(was_training)
        return [[s.tokens + ([self.end] if s.finish_reason == "stop" else []) for s in samples] for samples in results]

    def score(self, items: list[int], completions: list[list[list[int]]]) -> torch.Tensor:
        convs = [self.convs[i] for i, group in zip(items, completions) for _ in group]
        texts = [self.tokenizer.decode([t for t in c if t not in self.stop]) for group in completions for c in group]
        return torch.tensor(self.scorer(convs, texts), dtype=torch.float32).view(len(items), -1)

    def sequences(self, items: list[int], completions: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        """Prompt + completion rows, targets on the completion tokens only."""
        rows = [(self.prompts[i] + c, [IGNORE] * len(self.prompts[i]) + c)
                for i, group in zip(items, completions) for c in group]
        return collate(rows, self.tokenizer.pad_id)

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        G = self.cfg.group_size
        ks = list(range(first, first + count))
        items = [self.order(k) for k in ks]
        completions = self.rollouts(items, G, self.cfg.temperature, [self.cfg.seed + k * G for k in ks])
        rewards = self.score(items, completions)
        b = self.sequences(items, completions)
        b["ref"] = self.reference(b["x"], b["y"])
        b["advantages"] = group_advantages(rewards, self.cfg.scale_rewards == "group").view(-1)
        self.check_rollouts(rewards, completions)
        return b

    def check_rollouts(self, rewards: torch.Tensor, completions: list[list[list[int]]]) -> None:
        """Log the batch's rewards and lengths; warn (once each) when they show a run going nowhere."""
        lengths = torch.tensor([len(c) for g in completions for c in g], dtype=torch.float)
        self.note(reward=rewards, reward_std=rewards.std(1), completions__mean_length=lengths)
        spread = float((rewards.max(1).values - rewards.min(1).values).max())
        self.flat_batches = self.flat_batches + 1 if spread <= 1e-6 * max(1.0, float(rewards.abs().max())) else 0
        if self.opening is not None:
            self.opening += rewards.flatten().tolist()
            if len(self.opening) >= OPENING:
                self.check_opening(self.opening)
                self.opening = None
        if self.flat_batches == 3:
            self.warn("flat", f"the last 3 batches gave every completion of each prompt the same reward "
                      f"({float(rewards.flatten()[0]):g}...): no learning signal. Check the reward function or "
                      "model, or sample more varied answers (--temperature, --group-size)")
        if self.cfg.max_new_tokens > 4 and float((lengths <= 2).float().mean()) > 0.5:
            self.warn("short", "most completions end within 2 tokens: the policy may be collapsing to the "
                      "shortest answer. Lower --lr, raise --kl-coef, or lower --temperature")

    def check_opening(self, rewards: list[float]) -> None:
        """The first batches' rewards all one value: the reward itself tells no answer from another
        (a function that always returns 0, say). Said at once rather than after 3 flat batches."""
        if max(rewards) - min(rewards) > 1e-6 * max(1.0, max(abs(r) for r in rewards)):
            return
        source = f"--reward-fn {self.cfg.reward_fn}" if self.cfg.reward_fn else "the reward model"
        why = "every advantage is zero" if self.cfg.algo == "grpo" else "only the KL penalty trains"
        self.warn("constant", f"{source} gave all {len(rewards)} completions of the first batches the same reward "
                  f"({rewards[0]:g}): it gives no signal ({why}). Check that it scores different answers "
                  "differently")
        self.warned.add("flat")  # the flat-batches warning would say it again

    def warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.say(f"warning: {message}")

    def kl_control(self, kl: torch.Tensor) -> tuple[float, float]:
        """(the KL penalty's weight, the reward's weight) for a batch with these per-token KLs: the
        weight grows above --kl-target (kl_weight); past --max-kl the batch only pulls the policy back."""
        mean = float(kl.mean()) if kl.numel() else 0.0
        over = bool(self.cfg.max_kl) and mean > self.cfg.max_kl
        if over:
            self.warn("max_kl", f"mean per-token KL to the starting model reached {mean:.3g}, past --max-kl "
                      f"{self.cfg.max_kl:g}: such batches only pull the policy back (logged as kl_limited). If "
                      "it keeps happening, lower --lr or raise --kl-coef")
        coef = kl_weight(self.cfg.kl_coef, mean, self.cfg.kl_target)
        self.note(kl_coef=torch.tensor([coef]), kl_limited=torch.tensor([float(over)]))
        return coef, 0.0 if over else 1.0

    def loss(self, model, b) -> tuple[torch.Tensor, float, int]:
        mask = (b["y"] != IGNORE).float()
        logp, entropy = token_logps(model, b["x"], b["y"], self.cfg.temperature)
        pg, clipped = clipped_objective(logp, logp.detach(), b["advantages"][:, None], self.cfg.clip)
        kl = k3_kl(logp, b["ref"])
        n = mask.sum()
        on = mask.bool()
        coef, reward_weight = self.kl_control(kl.detach()[on])
        per_token = reward_weight * pg + coef * kl
        self.note(kl=kl.detach()[on], entropy=entropy.detach()[on], clip_ratio=clipped[on])
        return (per_token * mask).sum() / n.clamp(min=1), float(n), int((b["x"] != self.tokenizer.pad_id).sum())

    def evaluate(self, model) -> dict:
        """Mean reward of the greedy answers to (up to) the first 16 prompts."""
        items = list(range(min(16, len(self.prompts))))
        completions = self.rollouts(items, 1, 0.0, None)
        return {"val_reward": round(float(self.score(items, completions).mean()), 4)}


def end_of_turn(tokenizer: Tokenizer, template: Template) -> int:
    """The token the template ends an assistant turn with (the engine does not emit the stop token
    it stopped on; the policy must learn to produce this one)."""
    ids, trainable = encode_segments(tokenizer, template.render(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], tokenizer))
    return [t for t, keep in zip(ids, trainable) if keep][-1]


def make_reference(model: torch.nn.Module, lora: dict | None, temperature: float) -> Callable:
    """Reference log-probabilities [N, T] (on the CPU) of a batch's targets: the same weights with
    the adapters off under LoRA (no second copy in memory), else a frozen copy of the start."""
    frozen = None if lora is not None else copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ref = frozen if frozen is not None else model
        device, was_training = next(ref.parameters()).device, ref.training
        ref.eval()
        try:
            with adapters_off(ref):
                return token_logps(ref, x.to(device), y.to(device), temperature)[0].cpu()
        finally:
            ref.train(was_training)

    return reference
