"""Int8 weight-only inference (`--quantize int8`): the layer's arithmetic, and quality on a trained model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import make_docs

from lmforge.api import load
from lmforge.cli import main
from lmforge.core.errors import LMForgeError
from lmforge.models.quant import Int8Linear, quantize_model, quantize_rows


@pytest.mark.numerics
def test_int8_linear_matches_its_dequantised_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 200)
    q, scale = quantize_rows(lin.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.equal(scale, scale.bfloat16().float())  # the kernel's bf16 scales lose nothing
    assert ((q.float() * scale[:, None] - lin.weight).abs().max(1).values <= scale * 0.51).all()  # rounding only
    layer = Int8Linear(lin)
    x = torch.randn(3, 5, 96)
    want = nn.functional.linear(x, layer.effective_weight(), lin.bias)
    got = layer(x)
    assert got.shape == (3, 5, 200) and got.dtype == torch.float32
    # bf16 activations inside the int8 kernel: relative error of bf16's 8-bit mantissa (measured 0.28% of the
    # largest output; the fp32 accumulation order adds ~1e-7)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.numerics
def test_quality_on_a_trained_model(tiny_run):
    """Held-out perplexity within 1% of fp32 and greedy top-1 agreement >= 95% over 1,000+ positions."""
    fp32, int8 = load(tiny_run, device="cpu"), load(tiny_run, device="cpu", quantize="int8")
    assert isinstance(int8.model.lm_head, Int8Linear) and isinstance(int8.model.blocks[0].mlp.fc, Int8Linear)
    T = fp32.config.context_length
    ids = fp32.tokenizer.encode(" ".join(make_docs(60, seed=7)))  # not the training documents (seed 0)
    x = torch.tensor(ids[:len(ids) // T * T]).view(-1, T)
    assert x[:, 1:].numel() >= 1000
    with torch.no_grad():
        a, b = fp32.model(x)[:, :-1], int8.model(x)[:, :-1]
    nll = [nn.functional.cross_entropy(z.flatten(0, 1), x[:, 1:].flatten()) for z in (a, b)]
    ppl_ratio = (nll[1] - nll[0]).exp().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"int8 vs fp32 on {x[:, 1:].numel()} held-out positions: perplexity x{ppl_ratio:.5f}, top-1 agreement "
          f"{agree:.2%}")
    # int8 weights and bf16 activations, not computation order, set these: measured x1.00000 and 97.3%; another
    # CPU's kernels (and its slightly different tiny_run) move agreement by a few near-tied positions at most
    assert abs(ppl_ratio - 1) <= 0.01, ppl_ratio
    assert agree >= 0.95, agree
    # the loss path (evaluate) reads the dequantised output matrix: fp32 there, bf16 activations in the kernel
    # (measured 1.4e-5)
    with torch.no_grad():
        loss = int8.model(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - nll[1].item()) < 1e-2


def test_cli_generates_with_int8(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "-p", "The", "--max-new-tokens", "8", "--temperature", "0",
                 "--quantize", "int8"]) in (0, None)
    assert capsys.readouterr().out.startswith("The")
    with pytest.raises(LMForgeError, match="unknown quantisation"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int2")


@pytest.mark.numerics
def test_a_model_loaded_for_inference_quantises_too(tiny_run):
    """`load_model` makes the linear layers `InferenceLinear`; quantising such a model still works."""
    from lmforge.formats.load import load_model

    lm = load_model(tiny_run, device="cpu")  # set up for inference
    ids = torch.tensor([lm.tokenizer.encode("The new value")])
    with torch.no_grad():
        want = lm.model(ids)
        quantize_model(lm.model, "int8")
        got = lm.model(ids)
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # int8 weights, bf16 activations: quantisation error
