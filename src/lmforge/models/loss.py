"""The output layer fused with cross-entropy: the loss without materialising [tokens, vocab] logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    """Output layer + cross-entropy in row chunks, gradients computed during the forward pass.

    Materialising [tokens, vocab] logits, then log-softmax, then its backward and a zero-filled
    gradient buffer is a large share of a small model's step and of its memory. Processing a
    few rows at a time keeps each chunk's logits in cache; since the loss is a scalar, the
    gradients w.r.t. the hidden states and the weight can be formed right away, so backward
    only rescales them (no recomputation).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int):
        n_valid = (targets != ignore_index).sum()
        want_grad = any(ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(h) if want_grad else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate in >= fp32
        grad_w = torch.zeros_like(weight, dtype=acc) if want_grad else None
        grad_b = torch.zeros_like(bias, dtype=acc) if want_grad and bias is not None else None
        total = torch.zeros((), dtype=acc, device=h.device)
        rows = min(1024, max(128, (1 << 22) // weight.shape[0]))  # ~16 MB of fp32 logits per chunk
        denom = n_valid.clamp(min=1).to(acc)
        for s in range(0, h.shape[0], rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            raw = F.linear(hc, weight, bias)
            cdt = raw.dtype  # bf16 under autocast: do the gradient matmuls in it too
            logits = raw.to(acc) if raw.dtype != acc else raw
            valid = tc != ignore_index
            tgt = tc.clamp(min=0)
            target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: torch.logsumexp is several times slower on CPU.
            m = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(m).exp_()
            z = p.sum(dim=-1)
            lse = m.squeeze(1) + z.log()
            total += ((lse - target_logit) * valid).sum()
            if want_grad:  # d loss / d logits = (softmax - onehot) / n_valid, on valid rows
                weight_row = valid.to(acc) / denom
                g = p.mul_((weight_row / z)[:, None])
                g[torch.arange(len(tgt), device=g.device), tgt] -= weight_row
                grad_h[s:s + rows] = g.to(cdt) @ weight.to(cdt)
                if cdt == acc:
                    grad_w.addmm_(g.t(), hc.to(acc))
                else:
                    grad_w += (g.t().to(cdt) @ hc.to(cdt)).float()
                if grad_b is not None:
                    grad_b += g.sum(0)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                                  grad_b.to(bias.dtype) if grad_b is not None else None)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_out, grad_w * grad_out,
                grad_b * grad_out if grad_b is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(h, weight, bias)` against `targets`, memory-light and fast."""
    return _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index)
