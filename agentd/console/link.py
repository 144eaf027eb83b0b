"""The console's connection to the daemon: one socket, subscribed, reconnected with backoff.

``Link.run()`` yields what the console shows: every event the daemon publishes (dicts, as in
docs/protocol.md) and the link's own changes, ``Connected`` (with a fresh ``status``) and
``Disconnected`` (why, and when the next try is). Requests from the UI (chat, cancel, memory ops...)
go over the same connection with ``Link.request``, which turns every failure into a
``ConsoleError`` whose message can be shown as it is. Only the wire protocol is used (agentd.client).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.client import Client, ClientError, ConnectionLost, DaemonNotRunning, RequestError
from agentd.console.text import Backoff


class ConsoleError(Exception):
    """A request the console could not complete (not connected, refused, no answer)."""


@dataclass
class Connected:
    status: dict[str, Any]


@dataclass
class Disconnected:
    reason: str
    retry_in_s: float
    attempt: int
    was_connected: bool  # False while the first connection has not happened yet


class Link:
    def __init__(self, socket_path: str | os.PathLike[str], backoff: Backoff | None = None,
                 request_timeout_s: float = 30.0, connect_timeout_s: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self.backoff = backoff or Backoff()
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.client: Client | None = None
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    async def run(self) -> AsyncIterator[dict[str, Any] | Connected | Disconnected]:
        """Connect, subscribe and yield events forever; on any loss, yield ``Disconnected`` and retry."""
        ever = False
        while True:
            reason = "closed"
            client = Client(self.socket_path, timeout=self.connect_timeout_s)
            try:
                await client.connect()
                # Subscribe before asking for status, so no change between the two goes unseen.
                await client.request("subscribe", timeout=self.request_timeout_s)
                status = await client.request("status", timeout=self.request_timeout_s)
                self.client = client
                self.connects += 1
                ever = True
                self.backoff.reset()
                yield Connected(status)
                async for event in client.events():
                    yield event
            except DaemonNotRunning as exc:
                reason = str(exc)
            except RequestError as exc:  # e.g. shutting_down while subscribing
                reason = f"agentd refused the connection: {exc.message}"
            except TimeoutError:
                reason = "agentd did not answer in time"
            except ConnectionLost:
                reason = "agentd closed the connection (stopped or restarting)"
            except ClientError as exc:
                reason = f"lost the connection to agentd ({exc})"
            finally:
                self.client = None
                await client.close()
            delay = self.backoff.next()
            yield Disconnected(reason, delay, self.backoff.attempt, ever)
            await asyncio.sleep(delay)

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request's ``done`` result. ``timeout`` in seconds: None is ``request_timeout_s``;
        ``math.inf`` waits as long as the connection lasts (a chat turn has no fixed length)."""
        client = self.client
        if client is None or client.closed:
            raise ConsoleError("not connected to agentd (reconnecting)")
        wait = self.request_timeout_s if timeout is None else None if math.isinf(timeout) else timeout
        try:
            return await client.request(op, timeout=wait, **fields)
        except RequestError as exc:
            raise ConsoleError(f"agentd refused {op}: {exc.message} ({exc.code})") from None
        except TimeoutError:
            raise ConsoleError(f"agentd did not answer {op} within {wait:g} s") from None
        except ClientError as exc:
            raise ConsoleError(f"{op} failed: {exc}") from None
