"""The documentation stays true: every Python block of the README and of docs/ runs as written
(against a tiny model standing in for runs/demo), and the CLI reference describes exactly the flags
the parser has. (Every guide's shell commands run in order in `make test-docs`.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(ROOT), code) for page in PAGES
          for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_the_docs_have_python_examples():
    assert len([p for p, _ in BLOCKS if p.name == "README.md"]) >= 1
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("page,code", BLOCKS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_python_block_runs(page, code, tiny_run, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(tiny_run)  # the examples use the demo's model
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"{page}: block failed:\n{code}\n{p.stderr[-3000:]}"


def test_cli_reference_lists_every_verb_and_flag():
    """Generated from the same dataclasses as the parser: each verb's flags appear in its section."""
    from lmforge.cli import VERBS, build_parser
    from lmforge.cli.reference import markdown

    text = markdown()
    sections = dict(re.findall(r"^## lmforge (.+?)\n(.*?)(?=^## lmforge |\Z)", text, flags=re.S | re.M))
    assert set(sections) == set(VERBS)
    parser = build_parser()
    for name in VERBS:
        verb = parser
        for word in name.split():
            verb = next(a for a in verb._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
        flags = {s for a in verb._actions for s in a.option_strings if s.startswith("--")}
        flags -= {"--help", "--config"} | {f"--no-{f[2:]}" for f in flags}
        shown = set(re.findall(r"`(?:-\w, )?(--[\w-]+)`", sections[name]))
        assert flags == shown, (name, flags ^ shown)
    assert "| `--temperature` | number | `0.8` | >= 0 |" in sections["generate"]


def test_every_guide_is_in_the_site_navigation():
    import yaml

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    nav = set(pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert on_disk <= nav, on_disk - nav
    assert all((ROOT / "docs" / p).exists() or p == "reference/cli.md" for p in nav)
