"""LoRA: adapters on the output layer (tied or not), merging, and that adapters learn."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import reverse_records
from safetensors.torch import load_file

from lmforge import load
from lmforge.cli import main
from lmforge.models.config import ModelConfig
from lmforge.models.lora import apply_lora, freeze_for_lora, merge_lora
from lmforge.models.transformer import Transformer
from lmforge.training.tasks.instruct import InstructConfig, finetune_instruct


def tiny(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, context_length=16, n_layer=1, n_head=2, n_embd=16,
                                   tie_embeddings=tie))


def adapt_head(model: Transformer) -> Transformer:
    apply_lora(model, ["lm_head"], rank=4, alpha=8)
    with torch.no_grad():  # a non-zero update, as after training
        model.lm_head.lora_b.normal_(std=0.5)
    return model


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_sees_a_head_adapter(tie):
    model = adapt_head(tiny(tie))
    freeze_for_lora(model)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    loss = model(x, y)  # fused chunked loss vs full logits, fp32 order: measured 5e-7 on ~4.7
    assert loss.item() == pytest.approx(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item(), rel=1e-5)
    loss.backward()
    assert model.lm_head.lora_a.grad.abs().sum() > 0 and model.lm_head.lora_b.grad.abs().sum() > 0
    assert model.wte.weight.grad is None


@pytest.mark.numerics
def test_merging_an_adapter_on_a_tied_head_unties_it():
    model = adapt_head(tiny(tie=True))
    embedding = model.wte.weight.detach().clone()
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert not model.cfg.tie_embeddings and model.lm_head.weight is not model.wte.weight
    assert torch.equal(model.wte.weight, embedding)  # the input embedding is not the adapted output layer
    assert torch.allclose(before, after, atol=1e-5)  # W + s*B@A vs W x + s*B(A x), fp32: measured 1e-6 on ~5


def test_lm_head_lora_trains_saves_loads_and_merges(ft_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reverse_records(40)))
    out, merged_dir = tmp_path / "head", tmp_path / "merged"
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(data), out=str(out), max_steps=6, batch_size=4,
                                     lora_rank=4, lora_targets=["lm_head"], samples=0, device="cpu"))
    adapter = load_file(str(out / "adapter.safetensors"))
    assert set(adapter) == {"lm_head.lora_a", "lm_head.lora_b"} and adapter["lm_head.lora_b"].abs().sum() > 0
    base, tuned = load(ft_base, device="cpu"), load(out, device="cpu")
    assert base.config.tie_embeddings  # the case that needs untying on merge
    ids = torch.tensor([base.tokenizer.encode("Reverse the words: key path file")])
    delta = adapter["lm_head.lora_b"] @ adapter["lm_head.lora_a"] * (16 / 4)  # alpha / rank
    with torch.no_grad():  # loaded: the base body, and its output layer plus the saved update
        expected = F.linear(base.model.hidden(ids), base.model.wte.weight + delta)
        # merged vs separate products, fp32: measured 5e-6 on logits ~14, within 1e-5 + rtol 1e-5 (1.4e-4)
        assert torch.allclose(tuned.model(ids), expected, atol=1e-5)
        assert not torch.allclose(base.model(ids), expected, atol=1e-4)  # the update moves logits by ~0.2
    assert main(["merge-lora", str(out), "--out", str(merged_dir)]) == 0
    merged = load(merged_dir, device="cpu")
    assert not merged.config.tie_embeddings
    assert not json.loads((merged_dir / "config.json").read_text())["model"]["tie_embeddings"]
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert "lm_head.weight" in weights and torch.equal(weights["wte.weight"], base.model.wte.weight)
    with torch.no_grad():  # as above: measured 5e-6
        assert torch.allclose(tuned.model(ids), merged.model(ids), atol=1e-5)


def stop_token_loss(lm, convs) -> float:
    """Mean loss on the template's end-of-turn token where each answer ends."""
    from lmforge.text.templates import encode_segments, get_template

    template = get_template("chatml", lm.tokenizer)
    stop, losses = set(template.stop_tokens(lm.tokenizer)), []
    for conv in convs:
        ids, trainable = encode_segments(lm.tokenizer, template.render(conv, lm.tokenizer))
        with torch.no_grad():
            loss = F.cross_entropy(lm.model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="none")
        losses += [float(v) for v, t, keep in zip(loss, ids[1:], trainable[1:]) if keep and t in stop]
    return sum(losses) / len(losses)


def test_lora_with_lm_head_learns_an_end_of_turn_token_the_base_never_saw(ft_base, tmp_path):
    # The ChatML markers never occur in pretraining text, so the base's tied output rows for them
    # only learned "never predict". Adapters on the blocks alone cannot lift <|im_end|> over the
    # rest of the vocabulary through a frozen final norm and output layer (the model never stops:
    # exact match 0 in the README walkthrough); an adapter on lm_head can.
    from lmforge.data.records import read_instructions

    data, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reverse_records(360)))
    test.write_text("".join(json.dumps(r) + "\n" for r in reverse_records(20, seed=99)))
    convs = read_instructions(test)
    assert stop_token_loss(load(ft_base, device="cpu"), convs) > 3
    out = tmp_path / "lora"
    finetune_instruct(InstructConfig(base=str(ft_base), data=str(data), out=str(out), max_steps=150, batch_size=16,
                                     lr=1e-2, lora_rank=16, lora_alpha=32, lora_targets=["all", "lm_head"],
                                     eval_every=1000, samples=0, device="cpu"))
    assert stop_token_loss(load(out, device="cpu"), convs) < 1
