"""``agentd exec FILE|-``: run Python through the same sandbox the agent's EXEC uses.

Runs locally (no daemon needed) with the limits of ``[sandbox]`` in the configuration, prints the
code's stdout and stderr, then a one-line summary on stderr. The exit status mirrors the code's:
its own exit code, or 128+N when it was killed by signal N (a wall-clock or CPU limit).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agentd.config import Config


def add_parser(sub: Any) -> None:
    """Add the ``exec`` command to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser("exec", help="run Python code in the sandbox (no daemon needed)",
                                                description=__doc__.split("\n\n")[1])
    p.add_argument("file", help="a Python file, or - for stdin")
    p.add_argument("--wall-s", type=float, help="wall-clock limit (default: [sandbox] wall_s)")
    p.add_argument("--cpu-s", type=float, help="CPU limit (default: [sandbox] cpu_s)")
    p.add_argument("--memory-mb", type=int, help="address-space limit (default: [sandbox] memory_mb)")
    p.add_argument("--unrestricted", action="store_true",
                   help="turn the RestrictedPython policy layer off (the OS layers stay)")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON object instead")


def exit_status(exit_code: int) -> int:
    """A shell exit status for the code's: 128+N for a signal N, like a shell does."""
    return 128 - exit_code if exit_code < 0 else exit_code & 0xFF


def _quiet_logs() -> None:
    """Without the CLI's own logging set-up, keep info lines off stdout (it is the code's output)."""
    import logging

    import structlog

    if not structlog.is_configured():
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def run(args: argparse.Namespace, config: Config) -> int:
    from sandbox import Limits, SandboxError
    from sandbox import run as sandbox_run

    _quiet_logs()
    try:
        code = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except OSError as exc:
        print(f"agentd exec: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    limits = Limits.from_config(config.sandbox)
    changes: dict[str, Any] = {}
    if args.wall_s is not None:
        changes["wall_s"] = args.wall_s
    if args.cpu_s is not None:
        changes["cpu_s"] = args.cpu_s
    if args.memory_mb is not None:
        changes["memory_mb"] = args.memory_mb
    if args.unrestricted:
        changes["restricted"] = False
    try:
        limits = limits.replace(**changes)
        result = sandbox_run(code, limits)
    except (SandboxError, ValueError) as exc:
        print(f"agentd exec: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
        return exit_status(result.exit_code)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    layers = ",".join(k for k, v in result.layers.items() if v) or "none"
    print(f"[sandbox] exit_code={result.exit_code} limit={result.limit} timed_out={result.timed_out} "
          f"truncated={result.truncated} cpu_s={result.cpu_s:.3f} wall_s={result.wall_s:.3f} "
          f"peak_rss_mb={result.peak_rss_mb:.1f} layers={layers}", file=sys.stderr)
    return exit_status(result.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m agentd.cli_exec FILE``) until the CLI wires ``exec``."""
    from agentd import config as cfg

    parser = argparse.ArgumentParser(prog="agentd")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = parser.parse_args(["exec", *(sys.argv[1:] if argv is None else argv)])
    try:
        config = cfg.load()  # $AGENTD_CONFIG or the defaults
    except cfg.ConfigError as exc:
        print(f"agentd: config: {exc}", file=sys.stderr)
        return 2
    return run(args, config)


if __name__ == "__main__":
    sys.exit(main())
