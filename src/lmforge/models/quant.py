"""Int8 weight-only quantisation for inference: `generate/chat/serve --quantize int8`.

Each linear layer's weight W [out, in] becomes int8 values q and one fp32 scale per output row
(symmetric, absmax / 127), so W ~= q * scale[:, None]: a quarter of fp32's bytes, and batch-1
decoding is bound by the bytes of weights read per token.

The matmul: PyTorch's `_weight_int8pack_mm` (int8 weights, per-row scales) where it is fast. On
CPU (torch 2.13, x86) it has a vectorised kernel for bf16 activations only (its fp32 path is a
slow reference loop), so activations enter it in bf16 and the result returns in the model's dtype.
On other devices (not measured here), or where the kernel is missing, the weight is dequantised
per call: correct, and a quarter of the memory, but not faster.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError
from .lora import merge_lora

MODES = ("int8",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with w ~= q * scale[:, None], per output row, symmetric."""
    w = w.detach().float()
    # Scales rounded to bf16 values, since the int8 kernel takes them in bf16: q * scale is then
    # exactly the weight that kernel multiplies by.
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16).float()
    # contiguous: the kernel needs it, and a weight stored transposed would not be
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


@functools.cache
def _int8pack_dtype(device_type: str) -> torch.dtype | None:
    """bf16 where `_weight_int8pack_mm` runs (checked once with a tiny call), else None. Only the
    CPU kernel is used: it is the one measured here (see BENCHMARKS.md)."""
    if device_type != "cpu" or not hasattr(torch, "_weight_int8pack_mm"):
        return None
    try:
        x, q = torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(8, 64, dtype=torch.int8)
        ok = torch._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16)).eq(64).all().item()
    except (RuntimeError, NotImplementedError):
        return None
    return torch.bfloat16 if ok else None


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-row scales (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._scale_act: torch.Tensor | None = None  # the scales in the kernel's dtype, made on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _int8pack_dtype(x.device.type)
        if act is None:
            return F.linear(x, self.effective_weight().to(x.dtype), self.bias)
        if self._scale_act is None or self._scale_act.device != x.device:
            self._scale_act = self.scale.to(x.device, act)
        flat = x.reshape(-1, self.in_features).to(act)
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
