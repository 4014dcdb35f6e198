"""The output layer fused with cross-entropy: the loss without materialising [tokens, vocab] logits."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def _chunks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            ignore_index: int, acc: torch.dtype, softcap: float | None, argmax: bool = False) -> Iterator[tuple]:
    """Row chunks of the output layer: (start, h rows, clamped targets, valid rows, exp(logits - max),
    its row sums z, per-row loss (0 where ignored), the matmul dtype, with `softcap` the derivative
    of the cap, 1 - tanh^2, else None, and with `argmax` each row's top logit's index, else None).
    Logits are in `acc`.

    A few rows at a time keep each chunk's logits in cache (~16 MB of fp32 per chunk), so neither
    the forward nor a backward ever holds [tokens, vocab]. A GPU wants fewer, larger kernels: there
    a chunk is ~512 MB of fp32 logits (2,668 rows at GPT-2's vocabulary).
    """
    vocab = weight.shape[0]
    rows = max(1024, (1 << 27) // vocab) if h.device.type == "cuda" else min(1024, max(128, (1 << 22) // vocab))
    for s in range(0, h.shape[0], rows):
        hc, tc = h[s:s + rows], targets[s:s + rows]
        raw = F.linear(hc, weight, bias)
        cdt = raw.dtype  # bf16 under autocast: do the gradient matmuls in it too
        logits = raw.to(acc) if raw.dtype != acc else raw
        dcap = None
        if softcap:  # logits -> softcap * tanh(logits / softcap)
            t = torch.tanh(logits / softcap)
            logits, dcap = t * softcap, 1 - t * t
        valid = tc != ignore_index
        tgt = tc.clamp(min=0)
        target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
        top = logits.argmax(dim=-1) if argmax else None  # before the in-place softmax below
        # log-sum-exp by hand, in place: torch.logsumexp is several times slower on CPU.
        m = logits.amax(dim=-1, keepdim=True)
        p = logits.sub_(m).exp_()
        z = p.sum(dim=-1)
        loss = (m.squeeze(1) + z.log() - target_logit) * valid
        yield s, hc, tgt, valid, p, z, loss, cdt, dcap, top


def _add_grads(p, z, tgt, row_weight, hc, weight, cdt, acc, dcap, s, grad_h, grad_w, grad_b) -> None:
    """Accumulate the gradients of sum(row_weight * loss) for one chunk; `p` is overwritten.
    d loss / d logits = softmax - onehot, per row (times the cap's derivative, when capped)."""
    g = p.mul_((row_weight / z)[:, None])
    g[torch.arange(len(tgt), device=g.device), tgt] -= row_weight
    if dcap is not None:
        g.mul_(dcap)
    if grad_h is not None:
        grad_h[s:s + len(tgt)] = g.to(cdt) @ weight.to(cdt)
    if grad_w is not None and cdt == acc:
        grad_w.addmm_(g.t(), hc.to(acc))
    elif grad_w is not None:
        grad_w += (g.t().to(cdt) @ hc.to(cdt)).float()
    if grad_b is not None:
        grad_b += g.sum(0)


def _grad_buffers(h, weight, bias, acc, need: tuple[bool, bool, bool]):
    """Gradient buffers for h, weight and bias, only where wanted: a frozen output layer (LoRA)
    needs no buffer the size of the weight."""
    return (torch.empty_like(h) if need[0] else None, torch.zeros_like(weight, dtype=acc) if need[1] else None,
            torch.zeros_like(bias, dtype=acc) if bias is not None and need[2] else None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return grad.to(like.dtype) if grad is not None else None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean (or summed) cross-entropy of the output layer, gradients computed during the forward pass.

    Materialising [tokens, vocab] logits, then log-softmax, then its backward and a zero-filled
    gradient buffer is a large share of a small model's step and of its memory. Since the loss is
    a scalar, the gradients w.r.t. the hidden states and the weight can be formed chunk by chunk
    right away, so backward only rescales them (no recomputation). `want_grad` comes from the
    caller: forward always runs with grad mode off, and `needs_input_grad` is True even under
    `torch.no_grad()`, where the gradient buffers (as large as the weight) would be wasted.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, mean: bool, need: tuple[bool, bool, bool],
                softcap: float | None):
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate in >= fp32
        n_valid = (targets != ignore_index).sum()
        denom = n_valid.clamp(min=1).to(acc) if mean else torch.ones((), dtype=acc, device=h.device)
        grads = _grad_buffers(h, weight, bias, acc, need)
        want_grad = any(g is not None for g in grads)
        total = torch.zeros((), dtype=acc, device=h.device)
        chunks = _chunks(h, weight, bias, targets, ignore_index, acc, softcap)
        for s, hc, tgt, valid, p, z, loss, cdt, dcap, _ in chunks:
            total += loss.sum()
            if want_grad:
                _add_grads(p, z, tgt, valid.to(acc) / denom, hc, weight, cdt, acc, dcap, s, *grads)
        if want_grad:
            ctx.save_for_backward(grads[0], _cast(grads[1], weight), _cast(grads[2], bias))
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        return (*(g * grad_out if g is not None else None for g in ctx.saved_tensors), None, None, None, None, None)


class _TokenLosses(torch.autograd.Function):
    """Per-token cross-entropy [tokens] of the output layer (0 where ignored). Its gradient depends
    on a per-token upstream gradient, so backward recomputes each chunk's logits rather than
    keeping them: memory stays at one chunk either way."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, softcap: float | None):
        acc = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        for s, _, _, _, _, _, loss, _, _, _ in _chunks(h, weight, bias, targets, ignore_index, acc, softcap):
            out[s:s + len(loss)] = loss
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        device = h.device.type  # backward recomputes the logits as forward did, autocast included
        ctx.amp = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h, grad_w, grad_b = _grad_buffers(h, weight, bias, acc, ctx.needs_input_grad[:3])
        device, amp_dtype, amp = ctx.amp
        with torch.autocast(device, dtype=amp_dtype, enabled=amp):
            for s, hc, tgt, valid, p, z, _, cdt, dcap, _ in _chunks(h, weight, bias, targets, ctx.ignore_index, acc,
                                                                     ctx.softcap):
                row_weight = grad_out[s:s + len(tgt)].to(acc) * valid
                _add_grads(p, z, tgt, row_weight, hc, weight, cdt, acc, dcap, s, grad_h, grad_w, grad_b)
        return _cast(grad_h, h), _cast(grad_w, weight), _cast(grad_b, bias), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of `F.linear(h, weight, bias)` [N, vocab] against `targets` [N], memory-light
    and fast: never more than one chunk of logits exists.

    reduction: "mean" over non-ignored targets, "sum", or "none" for per-token losses [N] in fp32
    (0 where ignored), as `F.cross_entropy` gives them; evaluation sums these without ever holding
    the [N, vocab] logits. `softcap`: the logits are `softcap * tanh(logits / softcap)`.
    """
    if reduction == "none":
        return _TokenLosses.apply(h, weight, bias, targets, ignore_index, softcap)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    grad = torch.is_grad_enabled()  # forward runs with grad off, so the caller must ask
    need = tuple(grad and t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index, reduction == "mean", need, softcap)


@torch.no_grad()
def token_losses_and_predictions(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, ignore_index: int = -100,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [N] (fp32, 0 where ignored) of `F.linear(h, weight, bias)` against
    `targets` [N], and each row's top prediction (the logits' argmax) [N]: an evaluation's loss and
    accuracy from the same chunks, so the [N, vocab] logits never exist. No gradient."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    losses = torch.empty(h.shape[0], dtype=acc, device=h.device)
    top = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    for s, _, _, _, _, _, loss, _, _, best in _chunks(h, weight, bias, targets, ignore_index, acc, softcap, True):
        losses[s:s + len(loss)], top[s:s + len(loss)] = loss, best
    return losses, top
