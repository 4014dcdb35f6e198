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


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_sees_a_head_adapter(tie):
    model = adapt_head(tiny(tie))
    freeze_for_lora(model)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    loss = model(x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item(), rel=1e-5)
    loss.backward()
    assert model.lm_head.lora_a.grad.abs().sum() > 0 and model.lm_head.lora_b.grad.abs().sum() > 0
    assert model.wte.weight.grad is None


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
    assert torch.allclose(before, after, atol=1e-5)


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
    with torch.no_grad():
        assert not torch.allclose(base.model(ids), tuned.model(ids), atol=1e-4)  # the adapter is applied
    assert main(["merge-lora", str(out), "--out", str(merged_dir)]) == 0
    merged = load(merged_dir, device="cpu")
    assert not merged.config.tie_embeddings
    assert not json.loads((merged_dir / "config.json").read_text())["model"]["tie_embeddings"]
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert "lm_head.weight" in weights and torch.equal(weights["wte.weight"], base.model.wte.weight)
    with torch.no_grad():
        assert torch.allclose(tuned.model(ids), merged.model(ids), atol=1e-5)
