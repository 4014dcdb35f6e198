"""append_line: a log that grows a line at a time (metrics.jsonl) never holds part of a line, even
when its writer is SIGKILLed mid-write."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

from lmforge.core.fileio import PAGE, append_line

WRITER = """
import json, random, sys
from lmforge.core.fileio import append_line
rng = random.Random(int(sys.argv[2]))
i = 0
print("ready", flush=True)
while True:  # lengths from a few bytes to past a page (those replace the file), most of them straddling a boundary
    n = rng.choice([rng.randrange(9000), rng.randrange(4090)])
    append_line(sys.argv[1], json.dumps({"step": i, "pad": "x" * n}))
    i += 1
"""


def test_a_line_never_straddles_a_page_boundary(tmp_path):
    """The mechanism: a write inside one page is whole or absent under a kill, so each line up to a
    page long lies inside one page (the previous line padded with blanks when it would not)."""
    path, rng = tmp_path / "log.jsonl", random.Random(0)
    rows = [{"step": i, "pad": "y" * rng.randrange(5000)} for i in range(300)]
    for row in rows:
        append_line(path, json.dumps(row))
    data, start = path.read_bytes(), 0
    for line in data.split(b"\n")[:-1]:
        end = start + len(line) + 1
        assert len(line) + 1 > PAGE or start // PAGE == (end - 1) // PAGE, (start, end)
        start = end
    assert [json.loads(line) for line in data.decode().splitlines()] == rows  # blanks pad, rows are intact
    assert len(data) < 1.5 * sum(len(json.dumps(r)) + 1 for r in rows)


def test_a_kill_mid_write_leaves_only_whole_lines(tmp_path):
    """A writer appending long lines as fast as it can, SIGKILLed at random instants. With one plain
    O_APPEND write per line, this failed in 3 runs of 3 (ext4): a part-line cut at a page boundary."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1)
    for trial in range(40):
        path = tmp_path / f"log{trial}.jsonl"
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(trial)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == b"ready\n"
            try:
                proc.wait(timeout=rng.uniform(0.02, 0.15))
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, "the writer stopped by itself"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"trial {trial}: a part-line at the end: {data[data.rfind(b'{'):][:80]!r}"
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert [r["step"] for r in rows] == list(range(len(rows))) and rows, f"trial {trial}"


def test_a_line_that_does_not_fit_is_taken_back(tmp_path):
    """A short write (disk full; here the file size limit) leaves no part-line behind: an error."""
    path = tmp_path / "log.jsonl"
    code = f"""
import resource, signal
from lmforge.core.fileio import append_line
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
for i in range(4):
    try:
        append_line({str(path)!r}, '"' + 'z' * 297 + '"')
    except OSError as e:
        print(i, e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 ") and "no room for a line (100 of its 300 bytes written)" in out.stdout
    assert path.read_bytes() == 3 * (b'"' + b"z" * 297 + b'"\n')


def test_padding_that_does_not_fit_is_taken_back_and_a_torn_end_is_closed(tmp_path):
    """The padding before a page boundary is a write too: when the limit cuts it, the file keeps
    its rows and its final newline, and the next row still goes on a line of its own."""
    path = tmp_path / "log.jsonl"
    code = f"""
import resource, signal
from lmforge.core.fileio import append_line
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
append_line({str(path)!r}, '"' + 'a' * 2998 + '"')
resource.setrlimit(resource.RLIMIT_FSIZE, (3500, 3500))
try:
    append_line({str(path)!r}, '"' + 'b' * 2998 + '"')
except OSError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no room to pad its last line" in out.stdout, out.stdout + out.stderr
    assert path.read_bytes() == b'"' + b"a" * 2998 + b'"\n'

    path.write_bytes(b'{"step": 1}\n{"step": 2, "tor')  # cut short by something else
    append_line(path, '{"step": 3}')
    assert path.read_bytes().splitlines()[-1] == b'{"step": 3}'
