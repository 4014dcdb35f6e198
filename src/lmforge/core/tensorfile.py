"""Reading safetensors files tensor by tensor, straight into their final memory.

`safetensors.safe_open(...).get_tensor` copies out of a memory map, so while a model loads both the
mapped file pages and the copies are resident (about 2x the weights). Here each tensor is read with
plain file reads into a buffer that is, where possible, its final home: lmforge's fused q/k/v and
gate/up matrices are filled slice by slice. Peak memory stays close to the size of the weights.
The format is small: an 8-byte little-endian header length, a JSON header (dtype, shape, byte range
per tensor), then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .errors import LMForgeError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class TensorFile:
    """One safetensors file: `names`, `shape(name)`, `dtype(name)`, `read(name, out=None)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise LMForgeError(f"cannot read {self.path}: not a valid safetensors file ({e}); truncated?") from None
        self.start = 8 + n
        header.pop("__metadata__", None)
        self.info = header
        for name, t in header.items():
            if t.get("dtype") not in DTYPES:
                raise LMForgeError(f"{self.path}: tensor {name} has unsupported dtype {t.get('dtype')}")
            begin, end = t["data_offsets"]
            if self.start + end > size:
                raise LMForgeError(f"{self.path} is truncated: tensor {name} runs past the end of the file")
            if end - begin != math.prod(t["shape"]) * DTYPES[t["dtype"]].itemsize:
                raise LMForgeError(f"{self.path}: tensor {name} has the wrong number of bytes")

    @property
    def names(self) -> list[str]:
        return list(self.info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.info[name]["dtype"]]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` (contiguous, right shape; any dtype) if given."""
        shape, dtype = self.shape(name), self.dtype(name)
        direct = out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        buf = out if direct else torch.empty(shape, dtype=dtype)
        if buf.numel():
            begin, end = self.info[name]["data_offsets"]
            raw = buf.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes, written in place
            with open(self.path, "rb") as f:
                f.seek(self.start + begin)
                if f.readinto(raw) != end - begin:
                    raise LMForgeError(f"{self.path} is truncated (while reading {name})")
        if out is not None and not direct:
            out.copy_(buf.view(out.shape))
            return out
        return buf.view(shape) if out is None else out


def read_all(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file (what `safetensors.torch.load_file` returns, without the 2x peak)."""
    f = TensorFile(path)
    return {name: f.read(name) for name in f.names}
