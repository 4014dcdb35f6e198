"""`lmforge serve MODEL_DIR`: load the model, start the engine, answer HTTP until stopped."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ..core.errors import LMForgeError
from ..formats.load import load_model
from ..inference.engine import Engine
from .app import ServeConfig, create_app
from .generation import Backend


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cors_origins: list[str] | None = None, max_body: int = 1 << 20, max_queue: int = 64, slots: int = 8,
          device: str = "auto", model_name: str | None = None, feedback: str | None = None,
          quantize: str | None = "auto", prefill_chunk: int = 512) -> None:
    """Serve until Ctrl-C. The key may also come from LMFORGE_API_KEY; `quantize` (auto, none, int8,
    int4) as `lmforge.load` takes it; `prefill_chunk`: prompt tokens the engine feeds per step."""
    import uvicorn

    api_key = api_key or os.environ.get("LMFORGE_API_KEY") or None
    lm = load_model(model_dir, device=device, quantize=quantize)
    name = model_name or Path(model_dir).name
    cfg = ServeConfig(model_name=name, api_key=api_key, cors_origins=list(cors_origins or []), max_body=max_body,
                      max_queue=max_queue, feedback=feedback)
    engine = Engine(lm.model, slots=slots, prefill_chunk=prefill_chunk) if lm.kind.generates else None
    if engine is None and not lm.kind.is_encoder:
        raise LMForgeError(f"{model_dir} is {lm.kind.phrase}: serve needs a language model or an encoder")
    app = create_app(lm, cfg, Backend(lm, engine, name, max_queue))
    print(f"serving {name} ({lm.kind}) on http://{host}:{port}  (OpenAI API under /v1; "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)
    with engine if engine is not None else contextlib.nullcontext():
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
