"""The fused output layer + cross-entropy: reductions, per-token losses, and no work under no_grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.models import loss as loss_mod
from lmforge.models.config import ModelConfig
from lmforge.models.loss import linear_cross_entropy
from lmforge.models.transformer import Transformer


def problem(V: int = 40000, N: int = 300, C: int = 16):
    """A large vocabulary forces several row chunks; every 7th target is ignored."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, C, dtype=torch.float64, generator=g).requires_grad_()
    w = (0.1 * torch.randn(V, C, dtype=torch.float64, generator=g)).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    return h, w, b, t


# The float64 checks below (chunked fused loss vs F.cross_entropy of the full logits: other reduction order, other
# exp/log kernels) measure <=4e-15; atol 1e-10 (plus allclose's rtol 1e-5) holds for any order.
@pytest.mark.numerics
def test_per_token_losses_and_their_gradients_match_cross_entropy():
    h, w, b, t = problem()
    ours = linear_cross_entropy(h, w, b, t, reduction="none")
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="none")
    assert ours.shape == t.shape and torch.allclose(ours, ref, atol=1e-10)
    assert (ours[::7] == 0).all()
    up = torch.randn(t.shape, dtype=torch.float64)  # a per-token upstream gradient
    grads, ref_grads = (torch.autograd.grad((x * up).sum(), (h, w, b)) for x in (ours, ref))
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-10)
    total = linear_cross_entropy(h, w, b, t, reduction="sum")
    ref_total = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    assert torch.allclose(total, ref_total, atol=1e-8)
    for a, r in zip(torch.autograd.grad(total, (h, w, b)), torch.autograd.grad(ref_total, (h, w, b))):
        assert torch.allclose(a, r, atol=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, b, t, reduction="avg")


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.numerics
def test_no_gradient_buffers_under_no_grad():
    """Under no_grad nothing is trained, yet requires_grad is still set on the weights: the fused
    loss must not form gradients (a buffer the size of the output layer, and two matmuls per chunk)."""
    h, w, b, t = problem(V=3000)
    with torch.no_grad(), ShapeLog() as log:
        mean = linear_cross_entropy(h, w, b, t)
        per_token = linear_cross_entropy(h, w, b, t, reduction="none")
    assert tuple(w.shape) not in log.shapes
    assert not mean.requires_grad and not per_token.requires_grad
    assert torch.allclose(mean, per_token.sum() / (t != -100).sum(), atol=1e-10)
    with ShapeLog() as log:  # with grad enabled the same call does form them
        linear_cross_entropy(h, w, b, t)
    assert tuple(w.shape) in log.shapes


@pytest.mark.numerics
def test_frozen_output_layer_gets_no_weight_gradient(monkeypatch):
    sizes = []
    real = loss_mod._grad_buffers
    monkeypatch.setattr(loss_mod, "_grad_buffers", lambda *a: sizes.append(r := real(*a)) or r)
    h, w, b, t = problem(V=3000)
    w.requires_grad_(False)
    b.requires_grad_(False)
    linear_cross_entropy(h, w, b, t).backward()
    assert sizes[0][0] is not None and sizes[0][1] is None and sizes[0][2] is None
    ref_h = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), t), h)[0]
    assert torch.allclose(h.grad, ref_h, atol=1e-10)


@pytest.mark.numerics
def test_model_per_token_losses():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    y[0, :3] = -100
    with torch.no_grad():
        per_token = model(ids, y, reduction="none")
        ref = F.cross_entropy(model(ids).flatten(0, 1), y.flatten(), reduction="none").view(2, 12)
        # fp32, fused vs full logits: measured 5e-7 per token (~4.6), 8e-6 on the sum of 21 (~96); plus rtol 1e-5
        assert per_token.shape == (2, 12) and torch.allclose(per_token, ref, atol=1e-5)
        assert torch.allclose(model(ids, y, reduction="sum"), ref.sum(), atol=1e-4)
        assert torch.allclose(model(ids, y), ref.sum() / (y != -100).sum(), atol=1e-5)


class HandMadeLoRA(nn.Linear):
    """What a LoRA-wrapped layer looks like from outside: W x + b + scale * B A x."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def effective_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_b @ self.lora_a) * self.scale


@pytest.mark.numerics
def test_loss_path_sees_a_wrapped_output_layer():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=16,
                                    tie_embeddings=False, lm_head_bias=True))
    model.lm_head = HandMadeLoRA(model.lm_head)
    ids, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    fused = model(ids, y)
    ref = F.cross_entropy(model(ids).flatten(0, 1), y.flatten())  # through the module's own forward
    assert torch.allclose(fused, ref, atol=1e-5)  # fp32, effective weight vs two products: measured 5e-7 on ~6
    ga, gb = torch.autograd.grad(fused, (model.lm_head.lora_a, model.lm_head.lora_b))
    ra, rb = torch.autograd.grad(ref, (model.lm_head.lora_a, model.lm_head.lora_b))
    assert torch.allclose(ga, ra, atol=1e-5) and torch.allclose(gb, rb, atol=1e-5)
    weight, bias = model.head_weight_and_bias()
    assert bias is model.lm_head.bias and not torch.equal(weight, model.lm_head.weight)


@pytest.mark.numerics
def test_lm_evaluation_never_holds_all_logits():
    import numpy as np

    from lmforge.training.tasks.lm import evaluate_lm

    V, T, B = 8192, 64, 16  # 1024 positions per batch, more than one chunk of rows at this vocabulary
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, context_length=T, n_layer=1, n_head=2, n_embd=16))
    data = np.random.default_rng(0).integers(0, V, B * T + 1)
    with ShapeLog() as log:
        result = evaluate_lm(model, data, T, torch.ones(V, dtype=torch.long), batch_size=B)
    assert not [s for s in log.shapes if len(s) >= 2 and s[-1] == V and (len(s) == 3 or s[0] > 512)]
    x = torch.from_numpy(data[:-1].astype(np.int64)).view(B, T)
    y = torch.from_numpy(data[1:].astype(np.int64)).view(B, T)
    with torch.no_grad():
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    # fp32 mean over 1,024 positions of log-sum-exps over 8,192 logits, chunked vs whole: other summation orders,
    # ~sqrt(K) x 6e-8 relative typical (~2e-5 on 9.0). Measured 1.9e-6 (2 ulps) against the old 1e-5; now 1e-4,
    # still 50x below what leaving out a chunk of rows moves it (5e-3)
    assert result["tokens"] == B * T and abs(result["loss"] - ref) < 1e-4


@pytest.mark.numerics
def test_per_token_backward_outside_autocast():
    """Backward usually runs after the autocast block has closed; recomputed logits must still be
    formed the way forward formed them (bf16 matmuls of bf16 hidden states and an fp32 weight),
    not fail on mixed dtypes."""
    h, w, b, t = problem(V=3000)
    h = h.detach().to(torch.bfloat16).requires_grad_()  # what a bf16 layer hands the output layer
    w, b = (x.detach().float().requires_grad_() for x in (w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, b, t, reduction="none")
    ours.sum().backward()
    ref = F.cross_entropy(F.linear(h.float(), w, b), t, reduction="none")
    ref_grads = torch.autograd.grad(ref.sum(), (w, b))
    # bf16 logits vs fp32 ones: ~3 significant digits on losses ~10 (measured 9e-3); gradients within 5% of their
    # largest entry (bf16's 2^-8 relative, plus cancellation in the sums)
    assert torch.allclose(ours, ref, atol=0.1) and h.grad.dtype == torch.bfloat16
    for a, r in zip((w.grad, b.grad), ref_grads):
        assert a.dtype == torch.float32 and torch.allclose(a, r, atol=0.05 * r.abs().max().item())


@pytest.mark.numerics
def test_mlm_evaluation_scores_masked_positions_through_the_loss_path():
    """evaluate_mlm's loss and accuracy equal those of the full logits of a BERT-style model (head
    transform, biased output layer, bidirectional), yet no [B, T, vocab] logits are ever formed."""
    import numpy as np

    from lmforge.training.tasks.lm import evaluate_mlm, masked_eval_batches

    V, T, B = 33000, 128, 8  # ~150 masked rows per batch: more than one chunk of rows (128) at this vocabulary
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, context_length=T, n_layer=2, n_head=2, n_embd=32, causal=False,
                                    norm_position="post", embedding_norm=True, type_vocab_size=2,
                                    head_transform=True, activation="gelu", tie_embeddings=True,
                                    lm_head_bias=True)).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()  # not all zero: the bias must reach the scores
        model.lm_head.bias[5:15] += 4  # top predictions among the data's tokens: some right, most wrong
    data = np.random.default_rng(0).integers(5, 15, 2 * B * T + 10)  # 2 full batches and a short window
    special = torch.tensor([0, 1, 2, 3])
    with ShapeLog() as log:
        result = evaluate_mlm(model, data, T, 3, V, special, batch_size=B, seed=7)
    assert not [s for s in log.shapes if len(s) == 3 and s[-1] == V]
    nats, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets, _ in masked_eval_batches(data, T, 3, V, special, batch_size=B, seed=7):
            sel = targets != -100
            logits = model(inputs)[sel]  # the direct way: every position's logits, then the masked rows
            nats += F.cross_entropy(logits, targets[sel], reduction="sum").item()
            correct += int((logits.argmax(-1) == targets[sel]).sum())
            n += int(sel.sum())
    assert result["masked_tokens"] == n > 2 * 128
    # fp32 log-sum-exps over 33,000 logits, chunked vs whole: other summation orders (as for the LM loss above)
    assert result["masked_loss"] == pytest.approx(nats / n, abs=1e-5)
    assert result["masked_accuracy"] == correct / n and 0 < correct < n
