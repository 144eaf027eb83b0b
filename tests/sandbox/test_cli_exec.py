"""``agentd exec FILE|-``: same sandbox, no daemon; output printed, exit status mirrors the code's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def agentd_exec(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([sys.executable, "-m", "agentd.cli_exec", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)


def test_file_output_and_exit_status(tmp_path: Path) -> None:
    f = tmp_path / "prog.py"
    f.write_text("print('hello from the sandbox')\nraise SystemExit(3)\n")
    p = agentd_exec(str(f))
    assert p.returncode == 3
    assert p.stdout == "hello from the sandbox\n"
    assert "[sandbox] exit_code=3" in p.stderr and "pid_ns" in p.stderr


def test_stdin_and_limits() -> None:
    p = agentd_exec("-", "--wall-s", "1", stdin="while True: pass\n")
    assert p.returncode == 128 + 9 and "limit=wall timed_out=True" in p.stderr
    p = agentd_exec("-", "--json", stdin="print(().__class__)")
    res = json.loads(p.stdout)
    assert res["limit"] == "policy" and p.returncode == 1


def test_unreadable_file() -> None:
    p = agentd_exec("/nonexistent/prog.py")
    assert p.returncode == 2 and "cannot read" in p.stderr
