"""``agentd console``: a Textual terminal console for a running agentd.

It is a client of the socket protocol only (docs/protocol.md, through agentd.client), so it works
against a daemon started by systemd as well as one started by hand. The app is in ``app.py``, the
connection and its reconnect loop in ``link.py``, widgets in ``widgets.py``, dialogs in
``screens.py``, and the styles in ``console.tcss``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agentd.client import Client, DaemonNotRunning
from agentd.config import Config


def add_parser(sub: Any) -> None:
    """Add the ``console`` command to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "console", help="a terminal console: watch the agent breathe, think and speak, and talk to it",
        description="Open a Textual console on a running agentd: conversation, thoughts, EXEC approvals, "
                    "breath, Soma and memory. F1 lists the keys; ctrl+p has every action; ctrl+q quits.")
    # dest differs from the top-level --socket: a subparser default would overwrite that one.
    p.add_argument("--socket", dest="console_socket", metavar="PATH",
                   help="the daemon's socket (default: the configured [socket] path)")
    p.add_argument("--wait", action="store_true",
                   help="open even when no daemon runs yet, and connect when it starts")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often to refresh the status panels (default 5)")


async def _probe(path: Path) -> None:
    async with Client(path, timeout=5.0) as c:
        await c.request("status", timeout=10.0)


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run the console until the user quits; the exit status."""
    path = Path(args.console_socket).expanduser() if args.console_socket else cfg.socket_path
    if args.status_interval <= 0:
        print("agentd console: --status-interval must be > 0", file=sys.stderr)
        return 2
    if not args.wait:
        try:
            asyncio.run(_probe(path))
        except DaemonNotRunning as exc:
            print(f"agentd console: {exc}; start it with `agentd start`, or pass --wait", file=sys.stderr)
            return 1
        except TimeoutError:
            print(f"agentd console: agentd at {path} did not answer status within 10 s", file=sys.stderr)
            return 1
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("agentd console: needs a terminal (use `agentd chat` or `agentd status` in scripts)", file=sys.stderr)
        return 2
    from agentd.console.app import ConsoleApp  # Textual loads only when the console really opens

    ConsoleApp(path, status_interval_s=args.status_interval).run()
    return 0
