"""Sandbox latency: ``print(1)`` through ``sandbox.run`` next to a bare ``python -c 'print(1)'``.

Prints median and p99 wall time of each, in the same run, and the ratio against the target
(median <= 1.5x bare, p99 < 100 ms). ``python bench/sandbox.py [-n N]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time

import structlog

# This file is named like the package it measures: run as a script, its own directory comes first
# on sys.path and would shadow ``sandbox``.
_here = __import__("os").path.dirname(__import__("os").path.abspath(__file__))
sys.path[:] = [p for p in sys.path if __import__("os").path.abspath(p or ".") != _here]

from sandbox import Limits, run, shutdown  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200, help="runs of each (default 200)")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    limits = Limits()
    first = time.perf_counter()
    r = run("print(1)", limits)  # starts the fork server: reported apart, not in the figures
    first = time.perf_counter() - first
    assert r.stdout == "1\n", r
    sb: list[float] = []
    bare: list[float] = []
    for _ in range(args.n):  # interleaved so both see the same machine load
        t = time.perf_counter()
        r = run("print(1)", limits)
        sb.append(time.perf_counter() - t)
        assert r.stdout == "1\n" and r.exit_code == 0, r
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
        bare.append(time.perf_counter() - t)
        assert p.stdout == b"1\n"
    shutdown()
    ms = 1000.0
    sm, sp = statistics.median(sb) * ms, pct(sb, 0.99) * ms
    bm, bp = statistics.median(bare) * ms, pct(bare, 0.99) * ms
    print(f"runs: {args.n} each, interleaved; first run (fork server start) {first * ms:.1f} ms")
    print(f"layers: {','.join(k for k, v in r.layers.items() if v)}")
    print(f"{'':24}{'median ms':>10}{'p99 ms':>10}")
    print(f"{'sandbox.run print(1)':24}{sm:>10.1f}{sp:>10.1f}")
    print(f"{'bare python -c':24}{bm:>10.1f}{bp:>10.1f}")
    ratio = sm / bm
    print(f"median ratio sandbox/bare: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    print(f"sandbox p99: {sp:.1f} ms (target < 100 ms: {'met' if sp < 100 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
