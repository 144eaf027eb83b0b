"""A client of the daemon's socket protocol (docs/protocol.md), for the CLI, the console and tests.

    async with Client(path) as c:
        status = await c.request("status")
        async for event in c.stream("chat", text="hello"):   # streamed events, then the terminal one
            ...
        await c.request("subscribe")
        async for event in c.events():                       # everything the daemon publishes
            ...

One reader task demultiplexes replies by ``id``; events without an ``id`` go to ``events()``.
It imports nothing of the daemon: it speaks the wire protocol only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

MAX_LINE = 16 << 20


class ClientError(Exception):
    """Root of the client's errors."""


class DaemonNotRunning(ClientError):
    """Nothing accepts connections at the socket path."""


class ConnectionLost(ClientError):
    """The daemon closed the connection (it stopped, or refused a request)."""


class RequestError(ClientError):
    """The daemon answered a request with an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_END = object()


class Client:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Queue[Any]] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=MAX_LINE), self.timeout
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"agentd is not running (nothing listens at {self.path})") from exc
        except PermissionError as exc:
            raise DaemonNotRunning(f"no permission to use the agentd socket {self.path}") from exc
        except (TimeoutError, OSError) as exc:
            raise DaemonNotRunning(f"cannot connect to agentd at {self.path}: {exc}") from exc
        self._task = asyncio.create_task(self._read_loop(), name="agentd-client-reader")

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                rid = event.get("id") if isinstance(event, dict) else None
                key = None if rid is None else str(rid)
                if key is not None and key in self._pending:
                    self._pending[key].put_nowait(event)
                else:
                    self._events.put_nowait(event)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for q in self._pending.values():
                q.put_nowait(_END)
            self._events.put_nowait(_END)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests of malformed input use this)."""
        if self._writer is None:
            raise ConnectionLost("not connected")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionLost(f"agentd closed the connection: {exc}") from exc

    async def _send(self, op: str, fields: dict[str, Any]) -> str:
        rid = f"c{next(self._ids)}"
        self._pending[rid] = asyncio.Queue()
        await self.send_raw((json.dumps({"op": op, "id": rid, **fields}) + "\n").encode())
        return rid

    async def stream(self, op: str, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """Every event of one request, the terminal ``done`` last; an ``error`` raises RequestError."""
        rid = await self._send(op, fields)
        q = self._pending[rid]
        try:
            while True:
                event = await q.get()
                if event is _END:
                    raise ConnectionLost("agentd closed the connection before answering")
                if event.get("event") == "error":
                    raise RequestError(str(event.get("code")), str(event.get("message")))
                yield event
                if event.get("event") == "done":
                    return
        finally:
            self._pending.pop(rid, None)

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``done`` result."""

        async def _wait() -> dict[str, Any]:
            async for event in self.stream(op, **fields):
                if event.get("event") == "done":
                    return dict(event.get("result") or {})
            raise ConnectionLost("no answer")

        return await asyncio.wait_for(_wait(), timeout) if timeout else await _wait()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events not tied to a request of this client (after ``subscribe``: everything)."""
        while True:
            event = await self._events.get()
            if event is _END:
                raise ConnectionLost("agentd closed the connection")
            yield event


def request_sync(path: str | os.PathLike[str], op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """One request from synchronous code (the CLI)."""

    async def _go() -> dict[str, Any]:
        async with Client(path) as c:
            return await c.request(op, timeout=timeout, **fields)

    return asyncio.run(_go())
