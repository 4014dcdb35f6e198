"""Where code runs: device choice, compute dtype, and the torchrun/DDP process group."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import LMForgeError, PeerFailed

T = TypeVar("T")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError("--device cuda was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA (weights and optimizer stay fp32); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, by a piece of the
# device name (first match wins: the more specific names first).
BF16_PEAKS = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
              ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
              ("L40", 181e12), ("A6000", 155e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
              ("4090", 165e12), ("3090", 71e12)]


@contextlib.contextmanager
def eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode for the duration, then each module's own mode back (a model may mix them)."""
    training = [m for m in modules if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."): benchmark records name it, since
    MKL and oneDNN take different code paths on Intel and AMD."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (CUDA GPUs in the table; LMFORGE_PEAK_TFLOPS overrides),
    None where unknown: MFU is then not reported."""
    if os.environ.get("LMFORGE_PEAK_TFLOPS"):
        return float(os.environ["LMFORGE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS if key in name), None)


@dataclass
class Dist:
    """This process's place in the torchrun group (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        """A progress or status line on stderr, from rank 0 only (under torchrun only it speaks)."""
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Silence stderr (Python-level: prints, warnings, progress bars) on all ranks but 0, which
        reports the same things; errors still reach the caller as exceptions."""
        if self.main:
            yield
            return
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            yield

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _share_outcome(self, error: BaseException | None = None, result=None):
        """Rank 0 tells the others how its part went: they get its result, or raise PeerFailed.
        (A bare barrier would leave them waiting forever when rank 0 fails.)"""
        outcome = None
        if self.main:
            outcome = ("error", str(error) or type(error).__name__) if error is not None else ("ok", result)
        status, value = self.broadcast_object(outcome)
        if status == "error" and not self.main:
            raise PeerFailed(f"rank 0 failed: {value}")
        return value

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(...)` on rank 0 only; every rank gets its result, or raises if it failed."""
        if self.world == 1:
            return fn(*args, **kwargs)
        if not self.main:
            return self._share_outcome()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            self._share_outcome(e)
            raise
        return self._share_outcome(result=result)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. filling a cache); the others follow and reuse it.
        If rank 0 fails inside the block, the others raise PeerFailed instead of waiting."""
        if self.world == 1:
            yield
            return
        if not self.main:
            self._share_outcome()
            yield
            return
        try:
            yield
        except BaseException as e:
            self._share_outcome(e)
            raise
        self._share_outcome()


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


@contextlib.contextmanager
def distributed(device_name: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """`init_distributed` for the length of a block; the process group it joined is destroyed
    when the block ends, on success or error (so a training verb leaves no group behind)."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    finished = False
    try:
        yield init_distributed(device_name)
        finished = True
    finally:
        if joined and dist.is_initialized():
            if finished:  # leave together: a rank that tears down its connections while another is still
                dist.barrier()  # receiving its last message (e.g. a broadcast) makes that rank abort
            dist.destroy_process_group()
