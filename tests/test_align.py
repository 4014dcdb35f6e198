"""Alignment: preference data, the reward model, DPO and RLHF, against the published formulas and
end to end on a synthetic preference with a known rule (answers that end with "!" are preferred)."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import signal
import subprocess
import sys
import time

import align_check
import make_align_data as align_data
import pytest
import torch
from helpers import fails
from safetensors.torch import load_file

from lmforge import load
from lmforge.cli import main
from lmforge.core.errors import LMForgeError
from lmforge.data.preferences import parse_preference, read_preferences
from lmforge.inference.rank import parse_ranking
from lmforge.models.lora import LoRALinear, adapters_off
from lmforge.training.align_config import DPOConfig, RewardConfig, RLHFConfig
from lmforge.training.tasks import dpo as dpo_module
from lmforge.training.tasks.dpo import dpo_loss, train_dpo
from lmforge.training.tasks.instruct import InstructConfig, finetune_instruct
from lmforge.training.tasks.ppo import gae, whiten
from lmforge.training.tasks.reward import bradley_terry_loss, train_reward
from lmforge.training.tasks.rlhf import train_rlhf
from lmforge.training.tasks.rollout import clipped_objective, group_advantages, k3_kl, kl_weight


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the formulas -------------------------------------------------------------------------------

def test_bradley_terry_matches_the_formula():
    better, worse, margin = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.0, 1.0, 0.5])
    expected = [-math.log(_sigmoid(b - w - m)) for b, w, m in zip(better.tolist(), worse.tolist(), margin.tolist())]
    assert torch.allclose(bradley_terry_loss(better, worse, margin), torch.tensor(expected), atol=1e-6)
    centered = [e + 0.01 * (b + w) ** 2 for e, b, w in zip(expected, better.tolist(), worse.tolist())]
    assert torch.allclose(bradley_terry_loss(better, worse, margin, 0.01), torch.tensor(centered), atol=1e-6)


def test_dpo_losses_match_the_published_formulas():
    pc, pr = torch.tensor([-10.0, -7.5, -3.0]), torch.tensor([-12.0, -7.0, -9.0])
    rc, rr = torch.tensor([-11.0, -7.0, -4.0]), torch.tensor([-11.5, -7.2, -8.0])
    beta = 0.1
    h = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    formulas = {"sigmoid": [-math.log(_sigmoid(beta * x)) for x in h],  # Rafailov et al. (7)
                "hinge": [max(0.0, 1 - beta * x) for x in h],  # SLiC
                "ipo": [(x - 1 / (2 * beta)) ** 2 for x in h]}  # Azar et al. (17)
    for kind, expected in formulas.items():
        assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta, kind), torch.tensor(expected), atol=1e-5), kind
    assert abs(float(dpo_loss(pc, pc, rc, rc, beta)[0]) - math.log(2)) < 1e-6  # policy = reference: log 2


def test_adapters_off_gives_the_base_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4)
    layer = LoRALinear(base, rank=2, alpha=4, dropout=0.0)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), base(x))
    with adapters_off(layer):
        assert torch.equal(layer(x), base(x)) and torch.equal(layer.effective_weight(), base.weight)
    assert not torch.allclose(layer(x), base(x))


# -- preference records --------------------------------------------------------------------------

def test_three_record_forms_and_rankings():
    pair = parse_preference({"prompt": "P", "chosen": "a", "rejected": "b", "margin": 2}, "f:1")
    assert pair.conv == [{"role": "user", "content": "P"}] and pair.pairs() == [(0, 1)] and pair.margin == 2.0
    ranked = parse_preference({"prompt": "P", "responses": ["a", "b", "c", "d"]}, "f:2")
    assert ranked.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # C(4, 2), best first
    tied = parse_preference({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}],
                             "responses": ["a", "b", "c"], "ranks": [1, 1, 2]}, "f:3")
    assert tied.pairs() == [(0, 2), (1, 2)] and tied.conv[0]["role"] == "system"


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "P", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "P", "rejected": "a"}, "no 'chosen'"),
    ({"prompt": "P", "chosen": "a", "rejected": "a"}, "the same text"),
    ({"prompt": "P", "responses": ["a"]}, "at least 2"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [1, 1]}, "tied"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "score": 3}, "unknown field"),
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt' and 'messages'"),
    ({"messages": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "end with a user turn"),
])
def test_bad_preference_records(record, fragment):
    with pytest.raises(LMForgeError, match=fragment):
        parse_preference(record, "f:1")


# -- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    align_data.write_jsonl(d / "sft.jsonl", align_data.sft_records(400, 0))
    align_data.write_jsonl(d / "prefs.jsonl", align_data.preference_records(200, 1))
    align_data.write_jsonl(d / "prefs_val.jsonl", align_data.preference_records(50, 2))
    align_data.write_jsonl(d / "prompts.jsonl", align_data.prompt_records(64, 3))
    align_data.write_jsonl(d / "eval_prompts.jsonl", align_data.prompt_records(30, 4))
    return d


@pytest.fixture(scope="module")
def sft(ft_base, data, tmp_path_factory):
    """The instruction-tuned starting point: it answers, but rarely with "!"."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(data / "sft.jsonl"), out=str(out), max_steps=150,
                                     lr=3e-3, batch_size=16, eval_every=1000, samples=0, device="cpu"))
    return out


def follows_rule(model_dir, data) -> float:
    """Share of greedy answers to the held-out prompts that end with "!"."""
    return align_check.follows_rule(str(model_dir), str(data / "eval_prompts.jsonl"))["follows_rule"]


@pytest.fixture(scope="module")
def reward_model(sft, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    state = train_reward(RewardConfig(base=str(sft), data=str(data / "prefs.jsonl"), val=str(data / "prefs_val.jsonl"),
                                      out=str(out), max_steps=30, lr=1e-3, eval_every=30, device="cpu"))
    return out, state


def test_reward_model_learns_the_rule(reward_model, data, capsys):
    out, state = reward_model
    m = state["metrics"]
    assert m["val_accuracy"] >= 0.9 and m["val_margin"] > 0
    assert {"accuracy", "margin", "mean_reward", "val_min_reward", "val_max_reward"} <= m.keys()
    rm = load(out, device="cpu")
    system = align_data.SYSTEM
    assert rm.score("Describe the new list.", "The new list holds the value!", system) > \
        rm.score("Describe the new list.", "The new list holds the value.", system)
    capsys.readouterr()
    assert main(["score", str(out), "-p", "Describe the new list.", "-r", "The new list holds the value!",
                 "--system", system, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == pytest.approx(
        rm.score("Describe the new list.", "The new list holds the value!", system), abs=1e-5)
    fails(capsys, "text generation needs a decoder", "generate", str(out), "--prompt", "The")


def test_lora_reward_model(sft, data, tmp_path):
    out = tmp_path / "rm_lora"
    state = train_reward(RewardConfig(base=str(sft), data=str(data / "prefs.jsonl"), val=str(data / "prefs_val.jsonl"),
                                      out=str(out), max_steps=20, lr=3e-3, lora_rank=4, eval_every=20, device="cpu"))
    assert state["metrics"]["val_accuracy"] >= 0.9 and (out / "adapter.safetensors").exists()
    rm = load(out, device="cpu")  # the adapter over its base, with the trained scalar head
    assert str(rm.kind) == "reward"
    assert rm.score("Describe the new list.", "The new list holds the value!", align_data.SYSTEM) > \
        rm.score("Describe the new list.", "The new list holds the value.", align_data.SYSTEM)


def test_reward_model_resumes_exactly(sft, data, tmp_path):
    def cfg(out, **kw):
        return RewardConfig(base=str(sft), data=str(data / "prefs.jsonl"), out=str(out), max_steps=6, save_every=2,
                            eval_every=3, lr=1e-3, center_rewards=0.01, device="cpu", **kw)

    train_reward(cfg(tmp_path / "full"))
    state = train_reward(cfg(tmp_path / "part"), on_step=lambda s: s == 3 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 3
    assert train_reward(cfg(tmp_path / "part", resume=True))["step"] == 6
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "part"))
    assert "head.weight" in a and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_score_refuses_what_is_not_a_reward_model(sft, capsys):
    fails(capsys, "not a reward model", "score", str(sft), "-p", "x", "-r", "y")


def dpo_cfg(sft, data, out, **kw) -> DPOConfig:
    settings = dict(base=str(sft), data=str(data / "prefs.jsonl"), val=str(data / "prefs_val.jsonl"), out=str(out),
                    max_steps=40, lr=1e-4, eval_every=20, device="cpu")
    return DPOConfig(**{**settings, **kw})


def test_dpo_raises_rule_following(sft, data, tmp_path):
    before = follows_rule(sft, data)
    state = train_dpo(dpo_cfg(sft, data, tmp_path / "dpo"))
    m = state["metrics"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= m.keys()
    assert m["val_rewards/accuracies"] >= 0.9 and m["rewards/margins"] > 0
    after = follows_rule(tmp_path / "dpo", data)
    assert after >= before + 0.3, (before, after)


def test_dpo_resumes_exactly_without_recomputing_the_reference(sft, data, tmp_path, monkeypatch):
    def cfg(out, **kw):
        return dpo_cfg(sft, data, out, max_steps=8, save_every=3, eval_every=4, loss="ipo", **kw)

    train_dpo(cfg(tmp_path / "full"))
    state = train_dpo(cfg(tmp_path / "part"), on_step=lambda s: s == 5 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 5

    def no_recompute(*a, **k):
        raise AssertionError("the reference log-probabilities were computed again on resume")

    monkeypatch.setattr(dpo_module, "reference_logps", no_recompute)
    assert train_dpo(cfg(tmp_path / "part", resume=True))["step"] == 8
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_dpo_reference_is_the_base(sft, data, tmp_path):
    """With LoRA the reference is the base with the adapters off: at the start the policy equals it,
    so the first loss is log 2 exactly (sigmoid)."""
    out = tmp_path / "lora"
    state = train_dpo(dpo_cfg(sft, data, out, max_steps=1, lora_rank=4, log_every=1, eval_every=100, batch_size=4))
    assert state["metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "adapter.safetensors").exists() and (out / dpo_module.REFERENCE_FILE).exists()


def test_bad_alignment_input(sft, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "P", "chosen": "a", "rejected": "a"}) + "\n")
    out = tmp_path / "out"
    fails(capsys, "same text", "align", "dpo", str(sft), "--data", str(bad), "--out", str(out))
    fails(capsys, "--beta", "align", "dpo", str(sft), "--data", str(data / "prefs.jsonl"), "--out", str(out),
          "--beta", "0")
    assert not out.exists()


# -- RLHF (GRPO) ----------------------------------------------------------------------------------

def test_grpo_formulas():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0], [-4.13, -4.131, -4.129, -4.13]])
    scaled, centered = group_advantages(r, scale=True), group_advantages(r)
    for g in range(3):
        mean = sum(r[g].tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r[g].tolist()) / 3)  # unbiased, as torch.std and TRL
        # a few fp32 operations on values of size ~4: 1e-5 is tens of ulps
        assert torch.allclose(scaled[g], torch.tensor([(x - mean) / (std + 1e-4) for x in r[g].tolist()]), atol=1e-5)
        assert torch.allclose(centered[g], torch.tensor([x - mean for x in r[g].tolist()]), atol=1e-5)
    # near-equal rewards: GRPO's division blows the noise up to unit size; Dr. GRPO keeps it noise
    assert float(scaled[2].abs().max()) > 0.5 and float(centered[2].abs().max()) < 2e-3
    assert kl_weight(0.04, 0.05, 0.1) == 0.04 and kl_weight(0.04, 0.4, 0.1) == pytest.approx(0.16)
    assert kl_weight(0.04, 5.0, None) == 0.04
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.0, -0.5])
    expected = [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp.tolist(), ref.tolist())]
    assert torch.allclose(k3_kl(logp, ref), torch.tensor(expected), atol=1e-6) and float(k3_kl(ref, ref).sum()) == 0
    old, a = torch.tensor([-1.0, -1.0, -1.0, -1.0]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    new = torch.tensor([-0.5, -1.05, -0.5, -1.5])  # ratios e^0.5, e^-0.05, e^0.5, e^-0.5
    loss, clipped = clipped_objective(new, old, a, 0.2)
    want = [-min(math.exp(n - o) * x, min(max(math.exp(n - o), 0.8), 1.2) * x)
            for n, o, x in zip(new.tolist(), old.tolist(), a.tolist())]
    assert torch.allclose(loss, torch.tensor(want), atol=1e-6) and clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_gae_matches_the_recursion():
    """A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0),
    over each row's completion only (prompt positions before it, padding after it)."""
    gamma, lam = 0.9, 0.95
    r = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0], [0.0, 0.0, 0.3, 0.5, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.4, 0.2, 9.0], [9.0, 9.0, 0.1, -0.3, 9.0]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    adv, returns = gae(r, v, mask, gamma, lam)
    for row in range(2):
        ts = [t for t in range(5) if mask[row, t]]
        want, running = {}, 0.0
        for i in reversed(range(len(ts))):
            t = ts[i]
            next_v = float(v[row, ts[i + 1]]) if i + 1 < len(ts) else 0.0
            running = float(r[row, t]) + gamma * next_v - float(v[row, t]) + gamma * lam * running
            want[t] = running
        for t in range(5):
            assert float(adv[row, t]) == pytest.approx(want.get(t, 0.0), abs=1e-6)
            assert float(returns[row, t]) == pytest.approx(want[t] + float(v[row, t]) if t in want else 0.0, abs=1e-6)
    w = whiten(adv, mask)
    assert float(w[mask].mean()) == pytest.approx(0, abs=1e-6) and float(w[mask].std()) == pytest.approx(1, abs=1e-4)


def rlhf_cfg(sft, rm, data, out, **kw) -> RLHFConfig:
    settings = dict(base=str(sft), reward=str(rm), prompts=str(data / "prompts.jsonl"), out=str(out), max_steps=12,
                    lr=1e-4, batch_size=4, group_size=4, max_new_tokens=16, eval_every=100, log_every=1,
                    device="cpu")
    return RLHFConfig(**{**settings, **kw})


KL_BOUND = 0.1  # mean per-token k3 KL to the SFT model, at every one of 12 steps (kl_coef 0.04)


def test_grpo_raises_the_reward_with_bounded_kl(sft, reward_model, data, tmp_path):
    rm, _ = reward_model
    out = tmp_path / "grpo"
    state = train_rlhf(rlhf_cfg(sft, rm, data, out, lr=3e-4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "reward_std", "kl", "entropy", "completions/mean_length", "clip_ratio"} <= rows[-1].keys()
    assert max(r["kl"] for r in rows) < KL_BOUND
    first, last = (sum(r["reward"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first + 0.3, [r["reward"] for r in rows]
    assert "val_reward" in state["metrics"]  # evaluated at the end
    assert load(out, device="cpu").kind.generates  # the policy is a normal model directory


@pytest.fixture(scope="module")
def shape(ft_base, tmp_path_factory):
    """The shape task (make_align_data --task shape): SFT answers one of eight shapes at random, the
    preferences favour "pointed". SFT and reward model trained at their default learning rates."""
    d = tmp_path_factory.mktemp("shape")
    for name, records in (("sft", align_data.sft_records(400, 0, task="shape")),
                          ("prefs", align_data.preference_records(200, 1, task="shape")),
                          ("prefs_val", align_data.preference_records(50, 2, task="shape")),
                          ("prompts", align_data.prompt_records(64, 3, task="shape")),
                          ("eval_prompts", align_data.prompt_records(30, 4, task="shape"))):
        align_data.write_jsonl(d / f"{name}.jsonl", records)
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(d / "sft.jsonl"), out=str(d / "sft"), max_steps=150,
                                     batch_size=16, eval_every=1000, samples=0, device="cpu"))
    train_reward(RewardConfig(base=str(d / "sft"), data=str(d / "prefs.jsonl"), val=str(d / "prefs_val.jsonl"),
                              out=str(d / "rm"), max_steps=30, eval_every=30, device="cpu"))
    return d


def test_grpo_defaults_learn_a_choice_without_collapsing(shape, tmp_path):
    """The defaults (Dr. GRPO, the KL weight growing past its target, batches past --max-kl pulling
    back, the width's learning rate) raise rule-following by 0.2 or more, keep the answers' length and
    end within the KL bound. The old defaults (lr 1e-5 at any width) moved nothing; on the README's
    base, GRPO as published (std-scaled advantages, a fixed KL weight) reached KLs up to 4.7 and
    garbled its answers (BENCHMARKS.md)."""
    before = align_check.follows_rule(str(shape / "sft"), str(shape / "eval_prompts.jsonl"), task="shape")
    cfg = RLHFConfig(base=str(shape / "sft"), reward=str(shape / "rm"), prompts=str(shape / "prompts.jsonl"),
                     out=str(tmp_path / "grpo"), max_steps=60, batch_size=4, group_size=4, max_new_tokens=16,
                     eval_every=1000, device="cpu")
    train_rlhf(cfg)
    assert cfg.lr == pytest.approx(3e-4)  # 2.5e-5 x 768/64: the rule's value for this 64-wide model
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    after = align_check.follows_rule(str(tmp_path / "grpo"), str(shape / "eval_prompts.jsonl"), task="shape")
    assert after["follows_rule"] >= before["follows_rule"] + 0.2, (before, after)
    length = [r["completions/mean_length"] for r in rows]
    assert sum(length[-5:]) >= 0.9 * sum(length[:5]), length
    assert sum(r["kl"] for r in rows[-5:]) / 5 <= cfg.max_kl, [r["kl"] for r in rows]


def test_lora_grpo_resumes_exactly(sft, reward_model, data, tmp_path):
    rm, _ = reward_model

    def cfg(out, **kw):
        return rlhf_cfg(sft, rm, data, out, max_steps=4, batch_size=2, group_size=2, save_every=2, lora_rank=4,
                        lr=1e-3, **kw)

    train_rlhf(cfg(tmp_path / "full"))
    state = train_rlhf(cfg(tmp_path / "part"), on_step=lambda s: s == 3 and signal.raise_signal(signal.SIGINT))
    assert state["interrupted"] and state["step"] == 3
    assert train_rlhf(cfg(tmp_path / "part", resume=True))["step"] == 4
    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_b" in k)


def test_ppo_resumes_exactly_and_saves_the_policy_alone(sft, reward_model, data, tmp_path):
    rm, _ = reward_model

    def cfg(out, **kw):
        return rlhf_cfg(sft, rm, data, out, algo="ppo", max_steps=4, batch_size=2, group_size=2, save_every=2,
                        lr=1e-3, **kw)

    state = train_rlhf(cfg(tmp_path / "full"))
    assert {"value_loss", "reward", "kl", "clip_ratio"} <= state["metrics"].keys()
    train_rlhf(cfg(tmp_path / "part"), on_step=lambda s: s == 3 and signal.raise_signal(signal.SIGINT))
    train_rlhf(cfg(tmp_path / "part", resume=True))
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "part"))
    assert a.keys() == load_file(str(sft / "model.safetensors")).keys()  # the policy alone, no value head
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    va, vb = (load_file(str(tmp_path / run / "state" / "model.safetensors")) for run in ("full", "part"))
    assert torch.allclose(va["value_head.weight"], vb["value_head.weight"], atol=1e-6)
    assert float(va["value_head.weight"].abs().sum()) > 0  # the value head learned (and was resumed)


def test_rlhf_with_a_reward_function_and_bad_input(sft, data, tmp_path, capsys):
    (tmp_path / "verifiers.py").write_text("def text(prompt, completion):\n    return 'good'\n")
    base = ["align", "rlhf", str(sft), "--prompts", str(data / "prompts.jsonl"), "--device", "cpu"]
    out = tmp_path / "fn"
    assert main(base + ["--reward-fn", "make_align_data:exclaims", "--out", str(out), "--max-steps", "2",
                        "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert 0 <= summary["reward"] <= 1 and 0 <= summary["val_reward"] <= 1
    bad = tmp_path / "bad"
    fails(capsys, "cannot import", *base, "--reward-fn", "no_such_module:f", "--out", str(bad))
    sys.path.insert(0, str(tmp_path))
    try:
        fails(capsys, "not a finite number", *base, "--reward-fn", "verifiers:text", "--out", str(bad),
              "--max-steps", "1", "--batch-size", "1", "--group-size", "2")
    finally:
        sys.path.remove(str(tmp_path))
    fails(capsys, "--group-size must be at least 2", *base, "--reward-fn", "make_align_data:exclaims", "--out",
          str(bad), "--group-size", "1")
    fails(capsys, "not a reward model", *base, "--reward", str(sft), "--out", str(bad))
    fails(capsys, "exactly one of", *base, "--out", str(bad))
    assert not bad.exists() or not any(bad.iterdir())


def test_rlhf_warns_when_the_reward_carries_no_signal(sft, data, tmp_path, capsys):
    """A reward function that returns a constant: one line says so after the first batch (8 rewards),
    not after 3 flat ones. One that varies only between prompts leaves every group flat: that warning
    comes after 3 batches, and does not blame the function for giving no signal at all."""
    (tmp_path / "flat_reward.py").write_text("def zero(prompt, completion):\n    return 0.0\n\n\n"
                                             "def by_prompt(prompt, completion):\n"
                                             "    return sum(map(ord, prompt)) % 97\n")
    base = ["align", "rlhf", str(sft), "--prompts", str(data / "prompts.jsonl"), "--device", "cpu",
            "--max-new-tokens", "4"]
    sys.path.insert(0, str(tmp_path))
    try:
        assert main([*base, "--reward-fn", "flat_reward:zero", "--out", str(tmp_path / "zero"), "--max-steps", "1",
                     "--batch-size", "2", "--group-size", "4"]) == 0
        err = capsys.readouterr().err
        assert main([*base, "--reward-fn", "flat_reward:by_prompt", "--out", str(tmp_path / "by_prompt"),
                     "--max-steps", "3", "--batch-size", "2", "--group-size", "2"]) == 0
        err_by_prompt = capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --reward-fn flat_reward:zero gave all 8 completions of the first batches the same "
                        "reward (0): it gives no signal (every advantage is zero). Check that it scores different "
                        "answers differently"], err
    assert "gives no signal" not in err_by_prompt and "no learning signal" in err_by_prompt, err_by_prompt


# -- rank: the human in the loop ------------------------------------------------------------------

def test_parse_ranking():
    assert parse_ranking("2 1 3", 3) == [[1], [0], [2]]
    assert parse_ranking("2 = 1 3", 3) == parse_ranking("2=1 3", 3) == [[1, 0], [2]]
    assert all(parse_ranking(t, 3) is None for t in ("1 2", "1 1 2", "= 1 2 3", "1 2 3 =", "1 = = 2 3", "1 2 4", "x"))


class Terminal:
    """`lmforge ARGS` on a pseudo-terminal: read what it shows, type answers."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"), close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(end - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {text!r} in:\n{self.seen[-2000:]}")
            try:
                chunk = os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"the session ended before {text!r}:\n{self.seen[-2000:]}")
            self.seen += chunk
        shown, self.seen = self.seen.split(text, 1)
        return shown

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def shown_answers(screen: str) -> list[str]:
    return [line.split(") ", 1)[1].strip() for line in screen.splitlines() if line.strip()[:2] in ("1)", "2)", "3)")]


def test_rank_session_at_a_terminal(sft, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    align_data.write_jsonl(prompts, align_data.prompt_records(3, 7))
    out = tmp_path / "prefs.jsonl"
    args = ("rank", str(sft), "--prompts", str(prompts), "--out", str(out), "-k", "3", "--max-new-tokens", "12",
            "--device", "cpu")
    term = Terminal(*args)
    answers = shown_answers(term.expect("ranking ("))
    term.type("1 1 2")  # not a ranking: asked again
    term.expect("not a ranking")
    term.expect("ranking (")
    term.type("2 = 1 3")
    term.expect("[2/3]")
    term.expect("ranking (")
    term.type("s")
    term.expect("ranking (")
    term.type("q")
    assert term.close() == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and records[0]["responses"] == [answers[1], answers[0], answers[2]]
    assert records[0]["ranks"] == [1, 1, 2] and records[0]["meta"]["prompt_index"] == 0

    term = Terminal(*args)  # resumes after the last prompt ranked in the file
    screen = term.expect("ranking (")
    assert "resuming at prompt 2 of 3" in screen and "[2/3]" in screen
    answers = shown_answers(screen)
    term.type("3 1 2")
    term.expect("ranking (")
    term.type("\x04")  # Ctrl-D ends the session like q
    assert term.close() == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and records[1]["responses"] == [answers[2], answers[0], answers[1]]
    assert [len(r.pairs()) for r in read_preferences(out)] == [2, 3]  # the reader takes what rank writes
