"""llama.cpp's `llama-server`, built from the llama-cpp-python sdist's vendor/llama.cpp for this CPU,
and run as a child process: the reference side of benchmarks/serve_vs_llamacpp.py.

The CPU flags and the cache key are tests/install_llamacpp.py's (never -march=native, never AMX:
an AMX Xeon died with SIGILL on a native build), so the server and llama-cpp-python agree on what
this CPU runs. The binary is kept in ~/.cache/lmforge/llama-server/<version>-<flags hash>/.

    python benchmarks/llama_server.py          # build if needed (~15 min on 2 cores), print the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/ is not a package
from install_llamacpp import VERSION, build_dir, this_cpu_args  # noqa: E402

from lmforge.serve.process import ServerProcess  # noqa: E402

SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# Only the server: no tests, examples or HTTPS, and no web UI fetched from Hugging Face at build time.
SERVER_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"]


class BuildError(RuntimeError):
    """llama-server could not be built (no sdist, no compiler, a failed compile); the message says which step."""


def server_path() -> Path:
    return build_dir("llama-server", this_cpu_args()) / "llama-server"


def find_sdist(download_to: Path) -> Path:
    """The sdist from ~/.cache/lmforge or pip's cache if one is there, else `pip download` (the registry)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    for root in (cache / "lmforge", cache / "pip", download_to):
        found = next(root.rglob(SDIST), None) if root.is_dir() else None
        if found:
            return found
    download_to.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", f"llama-cpp-python=={VERSION}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(download_to)], capture_output=True, text=True)
    if r.returncode or not (download_to / SDIST).exists():
        raise BuildError(f"could not download the llama-cpp-python {VERSION} sdist: {r.stderr.strip()[-1500:]}")
    return download_to / SDIST


def build(log=sys.stderr) -> Path:
    """The llama-server binary for this CPU, built once (the CMake build tree is kept until it succeeds,
    so an interrupted build resumes)."""
    exe = server_path()
    if exe.exists():
        return exe
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise BuildError(f"building llama-server needs {tool}, which is not on PATH")
    flags = this_cpu_args()
    work = exe.parent / "work"
    sdist = find_sdist(exe.parent.parent / "sdist")
    src = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            tar.extractall(work, members=members, filter="data")
    print(f"building llama-server {VERSION} (~15 min on 2 cores; log: {work / 'build.log'}): {' '.join(flags)}",
          file=log, flush=True)
    t0 = time.time()
    log_file = work / "build.log"  # tail it to follow the build
    with open(log_file, "w+") as out:
        for step in (["cmake", "-S", str(src), "-B", str(work / "build"), *SERVER_ARGS, *flags],
                     ["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j2"]):
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                out.seek(0)
                raise BuildError(f"`{' '.join(step[:2])}` failed (log: {log_file}); its output ends:\n"
                                 f"{out.read()[-3000:]}")
    built = work / "build" / "bin" / "llama-server"
    if not built.exists():
        raise BuildError(f"the build finished without {built}")
    shutil.copy2(built, exe.with_suffix(".tmp"))
    exe.with_suffix(".tmp").rename(exe)  # atomic: a half-copied binary never looks built
    shutil.rmtree(work, ignore_errors=True)
    print(f"built {exe} in {(time.time() - t0) / 60:.1f} min", file=log, flush=True)
    return exe


def start(exe: Path, gguf: Path, slots: int, slot_context: int, threads: int, *extra: str) -> ServerProcess:
    """llama-server on `gguf` with `slots` parallel slots of `slot_context` tokens each (-c is the
    total, shared out among the slots), continuous batching (its default), `threads` for decode and
    prefill alike."""
    args = ["-np", str(slots), "-c", str(slots * slot_context), "-t", str(threads), "-tb", str(threads), "-cb",
            "--no-webui", *extra]
    return ServerProcess(gguf, *args, program=[str(exe), "-m"], timeout=300)


if __name__ == "__main__":
    try:
        print(build())
    except BuildError as e:
        sys.exit(f"llama-server build failed: {e}")
