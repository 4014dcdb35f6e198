"""benchmarks/gpu_check.py: its CPU smoke mode runs every step; a step past its timeout is recorded as
such while the run goes on; a step whose optional dependency is missing is skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["mfu_adamw", "mfu_muon", "mfu_transformers", "pretrain", "serve", "quant_decode"]


def gpu_check(out: Path, *args: str, env: dict | None = None) -> list[dict]:
    """Run the script (on CPU, smoke sizes); its JSON lines."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_smoke_run_records_every_step(tmp_path):
    lines = gpu_check(tmp_path / "x.jsonl")
    by_step = {line["step"]: line for line in lines}
    assert [line["step"] for line in lines] == ["env", *STEPS, "summary"]
    env = by_step["env"]
    assert env["torch"] and env["python"] and env["device"] == "cpu" and env["smoke"] and "gpu" in env
    # fastapi, uvicorn, httpx and transformers are in the dev venv: nothing may be skipped here
    failed = {s: by_step[s] for s in STEPS if by_step[s]["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1)[-4000:]
    for s in ("mfu_adamw", "mfu_muon", "mfu_transformers"):
        r = by_step[s]["result"]
        assert r["tokens_per_sec"] > 0 and r["batch"] == 4 and r["mfu"] is None  # no known peak on CPU
    pretrain = by_step["pretrain"]["result"]
    assert pretrain["val_bpb"] > 0 and pretrain["step"] == 5 and pretrain["mfu"] is None
    assert by_step["serve"]["result"]["concurrent_tok_s"] > 0
    quant = by_step["quant_decode"]["result"]
    assert quant["int8"]["tokens_per_sec"] > 0 and quant["int8"]["argmax_agreement_with_fp32"] >= 0.8
    assert quant["int4"].get("status", "ok") in ("ok", "skipped")
    summary = by_step["summary"]
    assert summary["statuses"] == {s: "ok" for s in STEPS} and summary["lmforge_adamw_over_transformers"] > 0


def test_a_step_past_its_timeout_is_recorded_and_the_run_goes_on(tmp_path):
    lines = gpu_check(tmp_path / "x.jsonl", "--steps", "mfu_adamw,mfu_muon", "--timeouts", "mfu_adamw=0.01")
    by_step = {line["step"]: line for line in lines}
    assert by_step["mfu_adamw"]["status"] == "timeout" and "stderr_tail" in by_step["mfu_adamw"]
    assert by_step["mfu_muon"]["status"] == "ok"
    assert by_step["summary"]["statuses"] == {"mfu_adamw": "timeout", "mfu_muon": "ok"}
    assert by_step["summary"]["lmforge_adamw_over_transformers"] is None


BLOCKER = """import sys


class Block:  # as if these were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "uvicorn", "httpx", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Block())
"""


def test_a_step_without_its_optional_dependency_is_skipped(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # imported at startup by every child Python
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    lines = gpu_check(tmp_path / "x.jsonl", "--steps", "mfu_transformers,serve", env={"PYTHONPATH": path})
    hf, serve = (line for line in lines if line["step"] in ("mfu_transformers", "serve"))
    assert hf["status"] == "skipped" and "transformers" in hf["reason"]
    assert serve["status"] == "skipped" and "fastapi" in serve["reason"]
