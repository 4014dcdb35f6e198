"""`lmforge serve MODEL_DIR`: load the model, start the engine, answer HTTP until stopped."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.runtime import available_memory
from ..formats.load import load_model
from ..inference.engine import Engine
from ..inference.prefix_cache import PrefixCache
from ..models.transformer import Transformer
from .app import ServeConfig, create_app
from .generation import Backend

# The default --slots and --max-queue, from the machine (docs/serve.md explains the rule).
KV_SHARE = 0.25  # of the memory free after loading: the most the default slots' KV cache may take
SLOTS_PER_CORE = 8  # on a CPU: a batch step's arithmetic grows with its rows, so more slots only slow each stream
MAX_SLOTS = 64
QUEUE_PER_SLOT = 4  # a request queued behind four rounds of the batch is better told to come back later


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_slots(model: Transformer) -> int:
    """As many slots as a quarter of the free memory holds KV caches for (each slot preallocates the
    whole context), at most 8 per CPU core on a CPU and 64 on a GPU."""
    cfg, p = model.cfg, next(model.parameters())  # the cache takes the parameters' dtype (Transformer.new_cache)
    layers = cfg.n_decoder_layer or cfg.n_layer  # an encoder-decoder caches its decoder, and its source per slot
    positions = cfg.context_length * (2 if cfg.is_encoder_decoder else 1)
    per_slot = 2 * layers * cfg.n_kv_head * cfg.head_dim * positions * p.element_size()
    free = torch.cuda.mem_get_info(p.device)[0] if p.device.type == "cuda" else available_memory()
    cap = min(MAX_SLOTS, SLOTS_PER_CORE * cpu_cores()) if p.device.type == "cpu" else MAX_SLOTS
    return max(1, min(cap, int(KV_SHARE * free) // per_slot if free else cap))


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cors_origins: list[str] | None = None, max_body: int = 1 << 20, max_queue: int | None = None,
          slots: int | None = None, device: str = "auto", model_name: str | None = None,
          feedback: str | None = None, quantize: str | None = "auto", prefill_chunk: int = 512,
          cache_mb: float | None = None, inspect: bool = False) -> None:
    """Serve until Ctrl-C. The key may also come from LMFORGE_API_KEY; `quantize` (auto, none, int8,
    int4) as `lmforge.load` takes it; `prefill_chunk`: prompt tokens the engine feeds per step;
    `cache_mb`: the prefix cache's bound (None: sized from free memory; 0: no prefix cache).
    `slots` and `max_queue` left out are sized from the machine (`default_slots`, 4 per slot);
    `inspect`: answer POST /inspect (attention weights) and put token ids in logprobs."""
    import uvicorn

    api_key = api_key or os.environ.get("LMFORGE_API_KEY") or None
    lm = load_model(model_dir, device=device, quantize=quantize)
    name = model_name or Path(model_dir).name
    if not lm.kind.writes_text and not lm.kind.is_encoder:
        raise LMForgeError(f"{model_dir} is {lm.kind.phrase}: serve needs a language model, an encoder-decoder "
                           "or an encoder")
    slots = slots or (default_slots(lm.model) if lm.kind.writes_text else 1)
    max_queue = max_queue or QUEUE_PER_SLOT * slots
    cfg = ServeConfig(model_name=name, api_key=api_key, cors_origins=list(cors_origins or []), max_body=max_body,
                      max_queue=max_queue, feedback=feedback, inspect=inspect)
    engine = None
    if lm.kind.writes_text and slots > 1:  # a served model is never trained or saved: the layout batched steps
        lm.model.for_inference(transpose=True)  # read fastest (one stream alone reads the stored one faster)
    if lm.kind.writes_text:
        prefix = None if cache_mb == 0 else PrefixCache(None if cache_mb is None else int(cache_mb * 2**20),
                                                        device=lm.device)
        engine = Engine(lm.model, slots=slots, prefill_chunk=prefill_chunk, prefix_cache=prefix)
    app = create_app(lm, cfg, Backend(lm, engine, name, max_queue, token_ids=inspect))
    batch = f"{slots} slots, queue of {max_queue}; " if engine is not None else ""
    if engine is not None and engine.prefix_cache is not None:
        batch += f"prefix cache {engine.prefix_cache.max_bytes / 2**20:.0f} MiB; "
    print(f"serving {name} ({lm.kind}) on http://{host}:{port}  (OpenAI API under /v1; {batch}"
          f"{'API key required' if api_key else 'no API key'}{'; POST /inspect on' if inspect else ''})",
          file=sys.stderr, flush=True)
    with engine if engine is not None else contextlib.nullcontext():
        # asyncio's create_server sets SO_REUSEADDR (POSIX): restarted right after a crash, the server binds at
        # once, although the dead one's connections still hold the port (FIN-WAIT, TIME-WAIT)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
