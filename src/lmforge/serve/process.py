"""`lmforge serve` as a child process on a free port: for tests, benchmarks and tools that need a
real server (one started exactly as a user would start it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start `lmforge serve MODEL_DIR ARGS...` on 127.0.0.1 (on `port`, or a free one) and wait until
    /health answers. Its output goes to a temporary file (a pipe nobody reads could fill up and stall it).
    `program` runs another server taking `PROGRAM MODEL --port N ARGS...` (llama.cpp's: [path, "-m"])."""

    def __init__(self, model_dir: str | Path, *args: str, timeout: float = 120, env: dict | None = None,
                 port: int | None = None, program: list[str] | None = None) -> None:
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        program = program or [sys.executable, "-m", "lmforge", "serve"]
        self.proc = subprocess.Popen([*program, str(model_dir), "--port", str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the server did not start within {timeout:g} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
