"""``agentd memory add|search|stats|export|import``.

``add``, ``search`` and ``stats`` talk to the running daemon over its socket. ``export`` and
``import`` (JSON Lines, one memory per line: ``id``, ``time``, ``kind``, ``source``, ``text``,
``meta``) go through the daemon when it runs (``memory.export`` / ``memory.import`` with a path the
daemon reads or writes) and open the data directory directly when it does not, so a stopped agent
can be backed up and moved too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentd.config import Config


class CliMemoryError(Exception):
    """A request the daemon answered with an error event (``code``) or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def add_parser(sub: Any) -> None:
    """Add the ``memory`` command to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser("memory", help="long-term memory: add, search, stats, export, import",
                                                description=__doc__.split("\n\n")[1])
    msub = p.add_subparsers(dest="memory_cmd", required=True, metavar="{add,search,stats,export,import}")
    a = msub.add_parser("add", help="store a memory (prints its memory_id once committed)")
    a.add_argument("text", help="the memory's text ('-' reads it from stdin)")
    a.add_argument("--meta", default="{}", help="a JSON object stored with it")
    s = msub.add_parser("search", help="the memories most similar to a query")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=5, help="how many (default 5)")
    s.add_argument("--json", action="store_true", help="print the raw JSON result")
    msub.add_parser("stats", help="counts, index kind, sizes (JSON)")
    e = msub.add_parser("export", help="write every memory to a JSON Lines file")
    e.add_argument("path")
    i = msub.add_parser("import", help="add the memories of a JSON Lines file (duplicates are skipped)")
    i.add_argument("path")


def run(args: argparse.Namespace, config: Config, request: Callable[..., Any] | None = None) -> int:
    """Run ``agentd memory ...``; returns the exit status. ``request(op, **fields)`` is a
    coroutine function sending one request to the daemon and returning its ``done`` result."""
    request = request or (lambda op, **f: socket_request(config.socket_path, op, **f))
    if args.memory_cmd in ("export", "import"):
        args.path = str(Path(args.path).expanduser().resolve())  # the daemon has another working directory
    try:
        return asyncio.run(_run(args, config, request))
    except CliMemoryError as exc:
        print(f"agentd memory {args.memory_cmd}: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, config: Config, request: Callable[..., Any]) -> int:
    cmd = args.memory_cmd
    if cmd == "add":
        text = sys.stdin.read() if args.text == "-" else args.text
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            raise CliMemoryError("bad_field", f"--meta is not JSON: {exc}") from None
        res = await request("memory.add", text=text, meta=meta)
        print(res["memory_id"])
        return 0
    if cmd == "search":
        res = await request("memory.search", query=args.query, k=args.k)
        if args.json:
            print(json.dumps(res, ensure_ascii=False, indent=2))
        else:
            for r in res["results"]:
                print(f"{r['memory_id']:>8}  {r['score']:.3f}  {r['text']}")
        return 0
    if cmd == "stats":
        print(json.dumps(await request("memory.stats"), indent=2, sort_keys=True))
        return 0
    path = args.path
    op = "memory.export" if cmd == "export" else "memory.import"
    try:
        res = await request(op, path=path)
    except CliMemoryError as exc:
        if exc.code != "no_daemon":
            raise
        res = await asyncio.to_thread(_offline, cmd, config, path)
    if cmd == "export":
        print(f"exported {res['count']} memories to {path}")
    else:
        print(f"read {res['read']}, added {res['added']}, duplicates {res['duplicates']}")
    return 0


def _offline(cmd: str, config: Config, path: str) -> dict[str, Any]:
    """Export / import on the data directory itself (the daemon is not running)."""
    from memory_store import LongTermMemory, MemoryStoreError

    try:
        with LongTermMemory(config.data_dir / "memory", config.memory) as m:
            if cmd == "export":
                return {"count": m.export(path)}
            return m.import_(path)
    except MemoryStoreError as exc:
        raise CliMemoryError("memory", str(exc)) from None


async def socket_request(socket_path: Path, op: str, **fields: Any) -> dict[str, Any]:
    """One request over the daemon's socket (agentd.client); the ``done`` result, or CliMemoryError."""
    from agentd.client import Client, ClientError, DaemonNotRunning, RequestError

    try:
        async with Client(socket_path) as c:
            # Generous: an import of many memories is embedded before the daemon answers.
            return await c.request(op, timeout=3600.0, **fields)
    except DaemonNotRunning as exc:
        raise CliMemoryError("no_daemon", str(exc)) from None
    except RequestError as exc:
        raise CliMemoryError(exc.code, exc.message) from None
    except (ClientError, TimeoutError) as exc:
        raise CliMemoryError("disconnected", str(exc) or "no answer from the daemon") from None
