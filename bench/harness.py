"""What the daemon benchmarks share: a real ``agentd start`` subprocess (the tests' ``DaemonProc``),
process accounting, and percentiles.

Run the bench scripts from the repository root (``.venv/bin/python bench/daemon.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import BASE_CONFIG, DaemonProc, merge  # noqa: E402  (the repo root is on sys.path now)

__all__ = ["BASE_CONFIG", "DaemonProc", "bench_config", "daemon_parser", "exported_ids", "merge", "percentile",
           "process_tree"]


def daemon_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's argument parser (its docstring as help) with the options of the daemon it starts."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--backbone", default="nexus", help="[backbone] name (default: nexus, the shipped trained default)")
    p.add_argument("--max-tokens", type=int, default=48, help="[backbone] max_tokens: tokens per generation stretch")
    p.add_argument("--threads", type=int, default=1, help="the daemon's torch threads (default: 1)")
    return p


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """A daemon with memory and sandbox on and a quick breath, for load."""
    return {
        "daemon": {"log_level": "warning", "log_format": "json", "torch_threads": args.threads},
        "breath": {"inhale_s": 0.01, "hold_s": 0.01, "exhale_s": 0.0, "pause_s": 0.2},
        "backbone": {"name": args.backbone, "max_tokens": args.max_tokens},
        "memory": {"enabled": True},
        "sandbox": {"enabled": True},
        "soma": {"ranges": {"temperature": [10.0, 45.0], "voltage": [11.0, 13.0]}},
    }


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, nearest rank; NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def process_tree(pid: int) -> dict[str, float]:
    """RSS (MiB, the daemon alone and with its children), process count and open files of a daemon."""
    p = psutil.Process(pid)
    kids = p.children(recursive=True)
    rss = p.memory_info().rss
    return {"rss_mib": rss / (1 << 20),
            "tree_rss_mib": (rss + sum(_rss(k) for k in kids)) / (1 << 20),
            "processes": 1 + len(kids), "open_files": p.num_fds()}


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def exported_ids(d: DaemonProc, path: Path) -> dict[int, str]:
    """Every memory the daemon holds, by id (through ``memory.export``)."""
    d.request("memory.export", timeout=300, path=str(path))
    out: dict[int, str] = {}
    with open(path) as f:
        for line in f:
            row: dict[str, Any] = json.loads(line)
            out[int(row["id"])] = row["text"]
    return out
