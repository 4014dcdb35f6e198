"""`make test-docs`: every guide's shell commands run as written, in the site's order, on a fresh clone
of this repository, so what one guide builds (runs/demo, data/, runs/reverse...) feeds the next.

A fenced `bash` block runs as one `bash -eo pipefail` script in the clone, with stdin closed (so `chat`
and `rank` end at once) and this virtual environment's `lmforge` and `python` first on PATH. An HTML
comment on the line before a block (invisible on the site) changes how it runs:
- `<!-- docs-test: skip REASON -->`: not run; the reason says why (a GPU, a download, your own files);
- `<!-- docs-test: background -->`: started in the background (a server), stopped at the end of the page;
  the next block runs once http://127.0.0.1:8000/health answers;
- `<!-- docs-test: slow -->`: run only with LMFORGE_DOCS_SLOW=1 (`make test-docs DOCS_SLOW=1`), for the
  blocks whose budgets take tens of minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- docs-test: (\w+)(?: ([^>]*))? -->\n)?```bash\n(.*?)```", re.S)


def guide_pages() -> list[str]:
    """The site's pages in navigation order."""
    def walk(nav):
        for item in nav:
            for value in item.values():
                yield from walk(value) if isinstance(value, list) else [value]

    return [p for p in walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]) if (ROOT / "docs" / p).exists()]


def blocks(page: str) -> list[tuple[str, str, str]]:
    """(mode, reason, script) for each bash block of a page; mode is run, skip, background or slow."""
    text = (ROOT / "docs" / page).read_text()
    return [(mode or "run", reason or "", code) for mode, reason, code in BLOCK.findall(text)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of this repository's HEAD (what a new user gets), sharing this environment."""
    path = tmp_path_factory.mktemp("walkthrough") / "lmforge"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(path)], check=True)
    return path


def _wait_for_server(proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the background server exited with {proc.returncode}")
        try:
            if httpx.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the background server did not answer /health in time")


@pytest.mark.docs_walkthrough
@pytest.mark.parametrize("page", guide_pages())
def test_guide_runs_as_written(page, clone):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    slow = os.environ.get("LMFORGE_DOCS_SLOW") == "1"
    background = []
    try:
        for mode, reason, script in blocks(page):
            if mode == "skip" or (mode == "slow" and not slow):
                assert mode == "slow" or reason, f"{page}: a skipped block must say why"
                continue
            if mode == "background":
                log = open(clone / f".{page}.server.log", "w")
                background.append(subprocess.Popen(["bash", "-c", f"exec {script.strip()}"], cwd=clone, env=env,
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                   start_new_session=True))
                _wait_for_server(background[-1])
                continue
            t0 = time.monotonic()
            p = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=clone, env=env, text=True,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=45 * 60)
            print(f"{page}: {time.monotonic() - t0:.0f} s\n{script}", file=sys.stderr)
            assert p.returncode == 0, (f"{page}: this block failed ({p.returncode}):\n{script}\n"
                                       f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def test_every_page_marks_what_it_skips():
    """A block is skipped only with a reason a reader can check."""
    for page in guide_pages():
        for mode, reason, _ in blocks(page):
            assert mode in ("run", "skip", "background", "slow"), (page, mode)
            assert mode != "skip" or len(reason) > 10, (page, reason)
