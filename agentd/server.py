"""The unix-socket server: JSON Lines in, events out (docs/protocol.md).

Every connection has a bounded outbound queue drained by its own writer task, so a slow client
loses its oldest events (counted) and never blocks the loop or other clients. Each request runs in
its own task; every request with an ``id`` gets exactly one terminal event (``done`` or ``error``).
Ops are registered by the daemon and its parts: ``server.register_op(name, handler)`` where
``handler(conn, request) -> dict`` returns the ``done`` result or raises ``OpError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("agentd.server")


class OpError(Exception):
    """A request refused with a protocol error ``code`` (bad_field, unavailable, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


Handler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any]]]


def field(req: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
    """``req[name]`` checked against ``kind``: missing_field / bad_field errors name the field."""
    if name not in req or req[name] is None:
        if required:
            raise OpError("missing_field", f"{req.get('op')} needs {name!r}")
        return default
    value = req[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise OpError("bad_field", f"{name!r} must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise OpError("bad_field", f"{name!r} must be {_names(kinds)}, got {type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object", list: "a list"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


class Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(server.client_queue)
        self.dropped = 0
        self.closed = False
        self.peer = _peercred(writer)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.subscriptions: list[Any] = []

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event for this client; the oldest goes when the queue is full."""
        if self.closed:
            return
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
            self.server.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("client_slow_dropped_events", pid=self.peer.get("pid"), dropped=self.dropped)
        self.queue.put_nowait(event)

    def error(self, rid: Any, code: str, message: str) -> None:
        self.send({"event": "error", "id": rid, "code": code, "message": message})

    async def writer_loop(self) -> None:
        try:
            while True:
                event = await self.queue.get()
                if event is None:
                    break
                self.writer.write((json.dumps(event, ensure_ascii=False, default=str) + "\n").encode())
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.closed = True


def _peercred(writer: asyncio.StreamWriter) -> dict[str, int]:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return {"pid": pid, "uid": uid, "gid": gid}
    except (OSError, AttributeError):
        return {}


class Server:
    def __init__(self, path: Path, mode: int, max_line_bytes: int, client_queue: int) -> None:
        self.path = path
        self.mode = mode
        self.max_line = max_line_bytes
        self.client_queue = client_queue
        self.ops: dict[str, Handler] = {}
        self.connections: set[Connection] = set()
        self.dropped = 0
        self.requests = 0
        self.errors = 0
        self.accepting = True
        self._server: asyncio.base_events.Server | None = None

    def register_op(self, name: str, handler: Handler) -> None:
        self.ops[name] = handler

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await _clear_stale_socket(self.path)
        # Bind under a restrictive umask so no client can connect before the chmod.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=self.max_line + 1)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)

    async def stop(self) -> None:
        """Stop accepting, tell clients goodbye, close connections, remove the socket."""
        self.accepting = False
        if self._server is None:
            return  # never served: the socket path may belong to another daemon
        self._server.close()
        for conn in list(self.connections):
            for t in conn.tasks:
                t.cancel()
            conn.queue.put_nowait(None) if not conn.queue.full() else None
        await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        wtask = asyncio.create_task(conn.writer_loop())
        log.debug("client_connected", **conn.peer)
        try:
            while self.accepting:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        self._line(conn, exc.partial)
                    break
                except asyncio.LimitOverrunError:
                    self.errors += 1
                    conn.error(None, "line_too_long", f"request line over {self.max_line} bytes; closing the connection")
                    break
                except (ConnectionError, OSError):
                    break
                if len(line) > self.max_line + 1:
                    conn.error(None, "line_too_long", f"request line over {self.max_line} bytes; closing the connection")
                    break
                if line.strip():
                    self._line(conn, line)
        finally:
            for sub in conn.subscriptions:
                sub.close()
            with contextlib.suppress(asyncio.QueueFull):
                conn.queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(wtask, 2.0)
            conn.closed = True
            for t in conn.tasks:
                t.cancel()
            writer.close()
            self.connections.discard(conn)

    def _line(self, conn: Connection, line: bytes) -> None:
        self.requests += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.errors += 1
            conn.error(None, "bad_utf8", f"request is not valid UTF-8 (byte {exc.start})")
            return
        try:
            req = json.loads(text)
        except ValueError as exc:
            self.errors += 1
            conn.error(None, "bad_json", f"request is not JSON: {exc}")
            return
        if not isinstance(req, dict):
            self.errors += 1
            conn.error(None, "not_object", f"request must be a JSON object, got {type(req).__name__}")
            return
        rid = req.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
            self.errors += 1
            conn.error(None, "bad_field", "'id' must be a string or an integer")
            return
        op = req.get("op")
        if op is None:
            self.errors += 1
            conn.error(rid, "missing_op", "request needs an 'op'")
            return
        if not isinstance(op, str):
            self.errors += 1
            conn.error(rid, "bad_field", "'op' must be a string")
            return
        handler = self.ops.get(op)
        if handler is None:
            self.errors += 1
            conn.error(rid, "unknown_op", f"unknown op {op!r}; known: {', '.join(sorted(self.ops))}")
            return
        task = asyncio.create_task(self._run(conn, handler, req, rid))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    async def _run(self, conn: Connection, handler: Handler, req: dict[str, Any], rid: Any) -> None:
        try:
            result = await handler(conn, req)
        except OpError as exc:
            self.errors += 1
            conn.error(rid, exc.code, exc.message)
        except asyncio.CancelledError:
            conn.error(rid, "shutting_down", "agentd is stopping")
            raise
        except Exception as exc:
            self.errors += 1
            log.exception("op_failed", op=req.get("op"))
            conn.error(rid, "internal", f"{type(exc).__name__}: {exc}")
        else:
            conn.send({"event": "done", "id": rid, "result": result})


async def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon, only after a connect to it fails."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        _, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError, OSError):
        path.unlink(missing_ok=True)
        log.info("stale_socket_removed", path=str(path))
        return
    w.close()
    raise RuntimeError(f"another process is serving {path}")
