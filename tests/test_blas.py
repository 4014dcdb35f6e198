"""CPU inference matmuls through numpy's BLAS (models/blas.py) and the engine steps that use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import PROMPTS, SHAPES, reference, tiny

from lmforge.inference.engine import Engine, Request
from lmforge.models import blas
from lmforge.models.quant import quantize_model
from lmforge.models.transformer import InferenceLinear


@pytest.mark.numerics
@pytest.mark.parametrize("bias", [True, False])
def test_inference_linear_matches_linear_inside_and_outside_blas(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias)
    weight = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    layer.__class__ = InferenceLinear
    threads = torch.get_num_threads()
    with torch.no_grad():
        for shape in [(1, 1, 24), (3, 24), (2, 7, 24), (300, 24)]:
            x = torch.randn(*shape)
            want = F.linear(x, weight, layer.bias)
            torch.testing.assert_close(model(x), want)  # outside blas_matmuls it is F.linear itself: exact
            with blas.blas_matmuls(2):
                assert blas.active() and torch.get_num_threads() == 1  # torch's pool steps aside
                got = model(x)
            assert not blas.active() and torch.get_num_threads() == threads
            assert got.shape == want.shape
            # OpenBLAS (numpy) vs MKL (torch): 24-term dot products summed in other orders, ~1e-7 (measured <=5e-7
            # on |y| < 3); 1e-5 + 1e-5 relative holds for any kernel either library picks
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 24, requires_grad=True)
    with blas.blas_matmuls(2):  # with gradients: torch's own matmul, so backward works
        model(x).sum().backward()
    assert x.grad is not None


def test_the_engine_uses_blas_for_cpu_float32_inference_models_only():
    model = tiny("gpt2")
    assert not Engine(model, slots=1)._blas  # plain nn.Linear layers: training-style model
    assert Engine(model.for_inference(), slots=1)._blas
    assert not Engine(quantize_model(tiny("gpt2")).for_inference(), slots=1)._blas  # int8 needs torch's threads


@pytest.mark.numerics
@pytest.mark.parametrize("kind", SHAPES)
def test_blas_engine_greedy_equals_the_reference_loop(kind):
    model = tiny(kind).for_inference()
    want = [reference(model, p, 12, temperature=0) for p in PROMPTS]  # torch's matmuls, one sequence
    engine = Engine(model, slots=3)
    assert engine._blas
    handles = [engine.submit(Request(p, max_tokens=12, temperature=0)) for p in PROMPTS[:2]]
    engine.step()
    handles += [engine.submit(Request(p, max_tokens=12, temperature=0)) for p in PROMPTS[2:]]
    # equal tokens from logits that differ by ~1e-7 (OpenBLAS, batched): the closest top-2 logits on these greedy
    # paths are ~9e-4 apart (gpt2; 0.2 llama)
    assert [h.result()[0].tokens for h in handles] == want


def test_blas_contexts_nest_and_each_thread_gets_its_own_setting_back():
    """Engines may step in several threads at once; each thread's torch setting comes back."""
    import threading

    threads = torch.get_num_threads()
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def other() -> None:
        before = torch.get_num_threads()
        with blas.blas_matmuls():
            entered.set()
            release.wait(10)
        seen["other"] = (before, torch.get_num_threads())

    t = threading.Thread(target=other)
    with blas.blas_matmuls():
        t.start()
        entered.wait(10)
        with blas.blas_matmuls():
            assert blas.active() and torch.get_num_threads() == 1
        assert blas.active() and torch.get_num_threads() == 1
    assert not blas.active() and torch.get_num_threads() == threads  # while the other is still inside
    release.set()
    t.join()
    assert seen["other"][0] == seen["other"][1] and torch.get_num_threads() == threads


def test_the_served_layout_changes_no_result():
    """for_inference(transpose=True) stores weights input-major behind transposed views: the same
    logits, and the same greedy tokens through the engine, tied embeddings included."""
    model = tiny("gpt2").for_inference()
    ids = torch.tensor([PROMPTS[3]])
    with torch.no_grad():
        want = model(ids)
    want_tokens = [reference(model, p, 12, temperature=0) for p in PROMPTS]
    model.for_inference(transpose=True)
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()
    assert model.lm_head.weight is model.wte.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=1e-6, atol=1e-6)  # the same products, either layout
    engine = Engine(model, slots=3)
    assert engine._blas
    assert [s[0].tokens for s in engine.generate([Request(p, max_tokens=12, temperature=0) for p in PROMPTS])] == \
        want_tokens
