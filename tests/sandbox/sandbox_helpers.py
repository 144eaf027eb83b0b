"""Helpers shared by the sandbox tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

import os

import psutil

# Modules the hostile corpus needs; restricted=False: the policy layer is off, only the OS stands.
OS_IMPORTS = ("os", "sys", "time", "signal", "socket", "ctypes", "subprocess", "resource", "random", "errno")


def sandbox_leftovers() -> list[psutil.Process]:
    """Processes of sandboxed code still alive (children run the fork-server image as another uid)."""
    me = os.geteuid()
    out = []
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "sandbox/_runner.py" in cmd and p.info["uids"] and p.info["uids"].real != me:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out
