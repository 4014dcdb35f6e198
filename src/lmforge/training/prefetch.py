"""The next batch is built while the current step computes: a background thread runs the task's
`batch` (numpy slicing, collation) and, on CUDA, puts the result in pinned memory so the copy to
the GPU is asynchronous. Batches are a pure function of their position in the stream, so building
them ahead changes nothing but the time."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = dict[str, torch.Tensor]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Prefetcher:
    """`get(first, count, then)`: the batch of windows first .. first+count-1 on the device, and
    start building the one at `then` (the next micro-batch or step). With `enabled=False` (a task
    whose batches need the model, e.g. RL rollouts) every batch is built when asked for."""

    def __init__(self, make: Callable[[int, int], Batch], device: torch.device, enabled: bool = True) -> None:
        self.make, self.device, self.enabled = make, device, enabled
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lmforge-prefetch") if enabled else None
        self.ahead: tuple[int, int, Future] | None = None

    def _build(self, first: int, count: int) -> Batch:
        batch = self.make(first, count)
        if self.pin:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def get(self, first: int, count: int, then: int) -> Batch:
        batch = None
        if self.ahead is not None:  # always wait for it: the task is never called from two threads at once
            at, n, future = self.ahead
            built = future.result()
            batch = built if (at, n) == (first, count) else None
            self.ahead = None
        if batch is None:
            batch = self._build(first, count)
        if self.pool is not None:
            self.ahead = (then, count, self.pool.submit(self._build, then, count))
        return to_device(batch, self.device)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.ahead = None
