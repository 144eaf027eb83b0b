"""Sandbox test helpers: limits that hand the code everything Python has (to test the OS layers, which
are the boundary), and the guard that must hold before any process or memory bomb runs."""

from __future__ import annotations

import os

import pytest
from sandbox_helpers import OS_IMPORTS

from sandbox import Limits, run


@pytest.fixture
def bare() -> Limits:
    """No policy layer, every module the corpus needs: what remains is the OS-level sandbox."""
    return Limits(restricted=False, allowed_imports=OS_IMPORTS, wall_s=3.0, cpu_s=2.0)


@pytest.fixture(scope="session")
def bomb_guard() -> dict[str, bool]:
    """The layers that must contain a fork or memory bomb, checked with harmless code first.

    A PID namespace (nothing outlives the run), an unprivileged uid (RLIMIT_NPROC means nothing for
    root) and a per-run pids cgroup (the hard task cap). Missing any of them, the bomb tests FAIL with
    this message instead of running: an escaped bomb takes the whole shared machine down.
    """
    r = run("import os; print(os.getpid(), os.getuid())",
            Limits(restricted=False, allowed_imports=("os",), max_processes=64))
    missing = [k for k in ("pid_ns", "uid", "pids_cgroup", "rlimits") if not r.layers.get(k)]
    if os.geteuid() != 0:
        missing = [k for k in missing if k != "pids_cgroup"] or missing  # non-root: NPROC counts
    if missing or r.exit_code != 0 or not r.stdout.startswith("1 "):
        pytest.fail(f"GUARD MISSING ({', '.join(missing) or 'probe failed'}): refusing to run bomb tests "
                    f"on this host; report to the lead. probe={r!r}")
    return r.layers
