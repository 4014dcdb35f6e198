"""Weight-only quantisation for inference: `generate/chat/serve/evaluate --quantize int8|int4`.

Each linear layer's weight W [out, in] becomes int8 values q and one fp32 scale per output row
(symmetric, absmax / 127), so W ~= q * scale[:, None]: a quarter of fp32's bytes, and batch-1
decoding is bound by the bytes of weights read per token.

The matmul: on x86 CPUs, fbgemm's int8 GEMM (`quantized.linear_dynamic`), which quantises the
activations to 8 bits per call as llama.cpp's q8_0 does (3x faster than the next option on
GPT-2's output layer). Elsewhere, or if a PyTorch drops it (its quantised-tensor API is
deprecated), `_weight_int8pack_mm` (int8 weights, per-row scales): on CPU it is vectorised for
bf16 activations only, so activations enter it in bf16. On other devices (not measured here), or
where neither kernel runs, the weight is dequantised per call: correct, and a quarter of the
memory, but not faster.

Int4: groups of 32 (or 128) input columns share a scale and a zero point, w = (q - 8) * scale +
zero with q in 0..15: an eighth of fp32's bytes plus 4 bytes a group. That is exactly the form of
GGUF's Q4_0, Q4_1 and Q4_K blocks, so those files load without requantising (formats/gguf_load.py).
The matmul is PyTorch's `_weight_int4pack_mm_for_cpu` (bf16 activations, its fast path) or, on
CUDA, `_weight_int4pack_mm`; each is checked once with a tiny call, and where it is missing or
wrong the weight is dequantised per call instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import LMForgeError
from .lora import merge_lora

MODES = ("int8", "int4")
INT4_GROUPS = (32, 128)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with w ~= q * scale[:, None], per output row, symmetric. Computed 1024 rows at
    a time, so the fp32 temporaries stay small beside a large matrix."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)  # contiguous: the kernel needs it
    scale = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], 1024):
        rows = w[i:i + 1024].detach().float()
        # Scales rounded to bf16 values, since the int8 kernel takes them in bf16: q * scale is then
        # exactly the weight that kernel multiplies by.
        s = (rows.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16).float()
        q[i:i + 1024] = torch.round(rows / s[:, None]).clamp(-127, 127)
        scale[i:i + 1024] = s
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


@functools.cache
def _dynamic_int8(device_type: str) -> bool | None:
    """Whether PyTorch's x86 int8 GEMM (fbgemm's `quantized.linear_dynamic`: activations quantised to 8
    bits per call, as llama.cpp's q8_0 does) runs here, checked with a tiny call; None where it does not.
    Its quantised-tensor API is deprecated in PyTorch, so its absence falls back to `_weight_int8pack_mm`."""
    if device_type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        q = torch.ones(8, 64, dtype=torch.int8)
        layer = Int8Linear(rows=(q, torch.full((8,), 0.5)))
        ok = torch.allclose(layer._fbgemm(torch.ones(2, 64)), torch.full((2, 8), 32.0), rtol=0.02)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return ok or None


@functools.cache
def _vnni() -> bool:
    """Whether this x86 CPU has VNNI: without it fbgemm's 8-bit activations must use 7 bits (reduce_range)
    so its 16-bit intermediate sums cannot overflow."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-row scales (inference only)."""

    def __init__(self, linear: nn.Linear | None = None, *, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                 bias: torch.Tensor | None = None) -> None:
        """From a float `linear`, or from already quantised `rows` ((q, scale) as `quantize_rows` gives)."""
        super().__init__()
        q, scale = quantize_rows(linear.weight) if linear is not None else rows
        bias = linear.bias if linear is not None else bias
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._scale_act: torch.Tensor | None = None  # the scales in the kernel's dtype, made on first use
        self._packed = None  # fbgemm's packed weight, once used on an x86 CPU

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 -> [M, N] through fbgemm; the weight is packed once, and the packed copy is then
        the only one kept (`effective_weight` unpacks it)."""
        if self._packed is None:
            import warnings

            with warnings.catch_warnings():  # the quantised-tensor constructors warn that they are deprecated
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                              torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qt, self.bias)
            self.qweight = self.qweight.new_empty(0)
        return torch.ops.quantized.linear_dynamic(x, self._packed, not _vnni())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None or (x.device.type == "cpu" and _dynamic_int8("cpu")):
            y = self._fbgemm(x.reshape(-1, self.in_features).float()).to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
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
        q = self.qweight if self._packed is None else torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()
        return q.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_groups(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in 0..15 as uint8 [N, K], scale [N, K/group], zero [N, K/group]) with w ~= (q - 8) * scale + zero:
    each group's minimum and maximum are represented exactly (asymmetric min-max, as GGUF's Q4_1)."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((g - lo[..., None]) / torch.where(scale > 0, scale, 1)[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, lo + 8 * scale


@functools.cache
def _int4_kernel_ok(device_type: str) -> bool:
    """Whether PyTorch's int4 matmul runs on this device and computes (q - 8) * scale + zero (a tiny call)."""
    try:
        q = (torch.arange(16 * 256) % 16).reshape(16, 256).to(torch.uint8)
        layer = Int4Linear(q, torch.full((16, 8), 0.5), torch.ones(16, 8), None, 32).to(device_type)
        x = torch.eye(256, device=device_type)
        want = (q.float() - 8) * 0.5 + 1
        return bool(torch.allclose(layer._kernel(x).t().float().cpu(), want))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights in groups along the input (inference only).

    `qweight` holds two values a byte (the even column in the high nibble), the layout CUDA's
    packer takes; on first use it is repacked once into the layout of this device's kernel.
    Rows are padded to a multiple of 16, which the CPU kernel needs."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 group: int = 32) -> None:
        super().__init__()
        n, k = q.shape
        if group not in INT4_GROUPS or k % group:
            raise LMForgeError(f"int4 groups are 32 or 128 columns and must divide the input width {k}")
        self.in_features, self.out_features, self.group = k, n, group
        pad = -n % 16
        q = torch.cat([q.to(torch.uint8), torch.full((pad, k), 8, dtype=torch.uint8)])
        scale, zero = (torch.cat([t.float(), t.new_zeros(pad, k // group).float()]) for t in (scale, zero))
        self.register_buffer("qweight", (q[:, ::2] << 4 | q[:, 1::2]).contiguous())
        # [K/group, N, 2]: the kernels' scales-and-zeros layout, in bf16 as they take it
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._packed: str | None = None  # the device type whose kernel layout qweight is in, once repacked

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 32) -> Int4Linear:
        q, scale, zero = quantize_groups(linear.weight, group)
        return cls(q, scale, zero, linear.bias, group)

    def _unpacked(self) -> torch.Tensor:
        q = self.qweight
        return torch.stack([q >> 4, q & 15], -1).reshape(q.shape[0], -1)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x W^T [M, N padded] through PyTorch's int4 kernel (packing the weight on first use)."""
        dev = x.device.type
        if self._packed != dev:
            if self._packed is not None:
                raise LMForgeError("an int4 layer used on one device cannot move to another; load it there")
            # CUDA's packer tiles the input width by 16 x inner_k_tiles (8, 4 or 2; widths are multiples of 32)
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.qweight = (torch._convert_weight_to_int4pack_for_cpu(self._unpacked().int(), 1) if dev == "cpu"
                            else torch._convert_weight_to_int4pack(self.qweight, tiles))
            self._packed = dev
        x = x.to(torch.bfloat16)
        if dev == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scales_zeros)
        return torch._weight_int4pack_mm(x, self.qweight, self.group, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None and not _int4_kernel_ok(x.device.type):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.effective_weight().to(x.dtype), bias)
        y = self._kernel(x.reshape(-1, self.in_features))[:, :self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def effective_weight(self) -> torch.Tensor:
        """The dequantised weight [N, K] in fp32 (what the loss path and checks use)."""
        if self._packed is not None:  # the kernel's own layout: read it back through the kernel
            eye = torch.eye(self.in_features, device=self.qweight.device)
            return self._kernel(eye).t()[:self.out_features].float()
        g = self.group
        sz = self.scales_zeros.float()
        q = self._unpacked()[:self.out_features].float().reshape(self.out_features, -1, g)
        scale, zero = sz[:, :self.out_features, 0].t(), sz[:, :self.out_features, 1].t()
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group={self.group}"


class Int8Embedding(nn.Module):
    """An embedding table with int8 rows and per-row scales: lookups return fp32 (a quarter of the
    memory of an fp32 table, which in a small model is a large share of all weights)."""

    def __init__(self, weight: torch.Tensor | None = None, *,
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight) if weight is not None else rows
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.qweight).float() * self.scale[idx, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantized_linear(linear: nn.Linear, mode: str, group: int = 32) -> nn.Module:
    """`linear` as an int8 or int4 layer; int4 falls back to int8 where the groups do not divide the width."""
    if mode == "int4" and linear.in_features % group == 0:
        return Int4Linear.from_linear(linear, group)
    return Int8Linear(linear)


def quantize_model(model: nn.Module, mode: str = "int8", group: int = 32) -> nn.Module:
    """Swap every nn.Linear of `model` for an int8 or int4 one, in place (the output layer too: at
    GPT-2 small's size it is a third of the weights), and the token embedding table for int8 rows.
    Position embeddings and norms stay as they are. `group`: int4's group size, 32 (finer, as
    GGUF's Q4 types) or 128 (less memory)."""
    if mode not in MODES:
        raise LMForgeError(f"unknown quantisation {mode!r} (choose {', '.join(MODES)})")
    if group not in INT4_GROUPS:
        raise LMForgeError(f"int4 groups are 32 or 128 columns, not {group}")
    merge_lora(model)  # an adapter directory: fold the adapters in first (a no-op without any)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized_linear(linear, mode, group))
    if isinstance(getattr(model, "wte", None), nn.Embedding):
        model.wte = Int8Embedding(model.wte.weight)
    return model
