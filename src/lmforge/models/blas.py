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

_state = threading.local()  # .depth: open blas_matmuls contexts in this thread; .torch_threads
_lock = threading.Lock()
_blas_threads = 0  # what numpy's BLAS was last set to (process-wide)


@contextmanager
def blas_matmuls(threads: int | None = None) -> Iterator[None]:
    """Within: CPU float32 linear layers multiply through numpy's BLAS on `threads` threads
    (default: torch's current count), and torch's intra-op pool runs one thread. Nests; torch's
    thread setting is per thread, so it is saved and restored per thread."""
    global _blas_threads
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        _state.torch_threads = torch.get_num_threads()
        n = threads or _state.torch_threads
        with _lock:
            if n != _blas_threads:
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=n, user_api="blas")  # stays in force (not used as a context)
                _blas_threads = n
        torch.set_num_threads(1)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth
        if depth == 0:
            torch.set_num_threads(_state.torch_threads)


def active() -> bool:
    return getattr(_state, "depth", 0) > 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for CPU float32 tensors without gradients, computed by numpy's BLAS."""
    y = torch.from_numpy(x.reshape(-1, x.shape[-1]).numpy() @ weight.numpy().T)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
