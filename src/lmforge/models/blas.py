"""CPU inference matmuls through numpy's BLAS (OpenBLAS), inside `blas_matmuls()`.

Why: at decode time every linear layer is a matrix-vector product (one row per sequence), and
PyTorch's CPU wheel runs those through MKL on a single thread; on AMD CPUs MKL also takes slower
code paths. numpy's bundled OpenBLAS splits them over its threads and reads the weights at close
to the memory bandwidth (BENCHMARKS.md, decode: 2-4x faster per product on the 2-core EPYC VM, and
1.2-1.4x for the many-row products of a prefill). The inference engine runs each step inside
`blas_matmuls(n)`: linear layers (`InferenceLinear`) multiply through numpy on n threads while
torch's own pool is held at one thread, so the two thread pools never compete for the cores.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_state = threading.local()  # .on: inside blas_matmuls in this thread
_lock = threading.Lock()
_blas_threads: list[int] = []  # the thread count numpy's BLAS was last set to


def _set_blas_threads(n: int) -> None:
    with _lock:
        if _blas_threads != [n]:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=n, user_api="blas")  # stays in force (not used as a context)
            _blas_threads[:] = [n]


@contextmanager
def blas_matmuls(threads: int | None = None) -> Iterator[None]:
    """Within: CPU float32 linear layers multiply through numpy's BLAS on `threads` threads
    (default: torch's current count), and torch's intra-op pool runs one thread."""
    threads = threads or torch.get_num_threads()
    _set_blas_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _state.on = True
    try:
        yield
    finally:
        _state.on = False
        torch.set_num_threads(before)


def active() -> bool:
    return getattr(_state, "on", False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for CPU float32 tensors without gradients, computed by numpy's BLAS."""
    y = torch.from_numpy(x.reshape(-1, x.shape[-1]).numpy() @ weight.numpy().T)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
