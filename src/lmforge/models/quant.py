"""Int8 weight-only quantisation for inference: `generate/chat/serve --quantize int8`.

Each linear layer's weight W [out, in] becomes int8 values q and one fp32 scale per output row
(symmetric, absmax / 127), so W ~= q * scale[:, None]: a quarter of fp32's bytes, and batch-1
decoding is bound by the bytes of weights read per token.

The matmul: PyTorch's `_weight_int8pack_mm` (int8 weights, per-row scales) where it is fast. On
CPU (torch 2.13, x86) it has a vectorised kernel for bf16 activations only (its fp32 path is a
slow reference loop), so activations enter it in bf16 and the result returns in the model's dtype.
Elsewhere, or where it is missing, the weight is dequantised per call (correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError
from .lora import merge_lora

MODES = ("int8",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with w ~= q * scale[:, None], per output row, symmetric."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int8pack_dtype(device: torch.device) -> torch.dtype | None:
    """The activation dtype `_weight_int8pack_mm` is fast with on this device, or None."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return None
    return torch.bfloat16 if device.type in ("cpu", "cuda") else None


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-row scales (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._act = _int8pack_dtype(q.device)
        self._scale_act = scale.to(self._act) if self._act is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._act is None:
            return F.linear(x, self.effective_weight().to(x.dtype), self.bias)
        if self._scale_act.device != x.device:  # moved with .to(): keep the cached copy beside the weights
            self._scale_act = self.scale.to(x.device, self._act)
        flat = x.reshape(-1, self.in_features).to(self._act)
        y = torch._weight_int8pack_mm(flat, self.qweight, self._scale_act).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def effective_weight(self) -> torch.Tensor:
        """The dequantised weight (what the loss path and checks use)."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Swap every nn.Linear of `model` for an Int8Linear, in place (the output layer too: at GPT-2
    small's size it is a third of the weights). Embeddings and norms stay as they are."""
    if mode not in MODES:
        raise LMForgeError(f"unknown quantisation {mode!r} (choose {', '.join(MODES)})")
    merge_lora(model)  # an adapter directory: fold the adapters in first (a no-op without any)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8Linear(linear))
    return model
