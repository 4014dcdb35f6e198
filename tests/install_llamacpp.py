"""Install llama-cpp-python (the GGUF reference for `make test-gguf`), built from its sdist for
this CPU, the portable way.

Its default build passes -march=native. On an Intel Xeon that advertises AMX, that build died
with SIGILL on every quantized type (Q8_0, Q4_0, Q4_K_M) while F32 and F16 ran. So: GGML_NATIVE off,
and each x86 extension switched on by name only when /proc/cpuinfo lists it. AMX never is.

The wheel is kept in ~/.cache/lmforge/llamacpp/<version>-<flags>/: pip's own wheel cache keys a
build by the sdist alone, so it would hand a wheel built for one CPU to another.

    python tests/install_llamacpp.py            # build if needed, then pip install
    python tests/install_llamacpp.py --print    # only show the CMake flags this CPU gets
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
# cpuinfo flag -> ggml CMake option; the ones ggml turns on by default are named too, so a CPU
# without them (an old one, or a VM that hides them) gets them off.
X86_OPTIONS = {
    "sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "bmi2": "GGML_BMI2", "fma": "GGML_FMA",
    "f16c": "GGML_F16C", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cmake_args(flags: set[str]) -> list[str]:
    """-D options for this CPU: native off, each extension on only where the CPU has it, AMX off."""
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_OPTIONS.items()]
    return args + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def this_cpu_args() -> list[str]:
    """The CMake flags for this machine's CPU; off x86 (or without /proc), ggml's own defaults for a generic build."""
    info = Path("/proc/cpuinfo")
    if info.exists() and os.uname().machine == "x86_64":
        return cmake_args(cpu_flags(info.read_text()))
    return ["-DGGML_NATIVE=OFF"]


def build_dir(kind: str, flags: list[str]) -> Path:
    """~/.cache/lmforge/KIND/<version>-<flags hash>: a build is kept per CPU flag set, not per sdist alone."""
    key = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lmforge" / kind / f"{VERSION}-{key}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the CMake flags and stop")
    args = ap.parse_args()
    flags = this_cpu_args()
    if args.print:
        print(" ".join(flags))
        return
    wheels = build_dir("llamacpp", flags)
    pip = [sys.executable, "-m", "pip"]
    if not list(wheels.glob("*.whl")):
        print(f"building llama-cpp-python {VERSION} from source (several minutes on 2 cores): {' '.join(flags)}",
              file=sys.stderr, flush=True)
        env = {**os.environ, "CMAKE_ARGS": " ".join(flags), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(pip + ["wheel", "--quiet", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                              "-w", str(wheels), f"llama-cpp-python=={VERSION}"], env=env, check=True)
    wheel = sorted(wheels.glob("*.whl"))[-1]
    subprocess.run(pip + ["install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)], check=True)
    # Its pure-Python dependencies (numpy, jinja2, diskcache, typing-extensions) from the registry.
    subprocess.run(pip + ["install", "--quiet", str(wheel)], check=True)


if __name__ == "__main__":
    main()
