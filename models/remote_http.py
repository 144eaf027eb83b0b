"""The wire side of the ``remote`` backbone: an OpenAI-compatible server over HTTP.

    Http          one request per connection (stdlib ``http.client``): ``stream`` yields the
                  response's lines as they arrive, ``get_json`` for probes; a watcher thread shuts
                  the socket when the turn is cancelled, so nothing waits out a read timeout
    Retryable     a failure another attempt may not have (refused, timed out, 408/409/425/429/5xx,
                  a broken stream); ``RemoteError`` is one that ends the turn
    Health        what ``status`` shows of the server, updated from any thread
    read_api_key  the key from a file or an environment variable, never from the config

``cfg`` is a ``models.remote.RemoteConfig`` (base_url, timeouts, api_key_file, api_key_env).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from models.base import ModelError

__all__ = ["Health", "Http", "RemoteError", "Retryable", "public_url", "read_api_key", "retry_after"]

log = structlog.get_logger("models.remote")

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_MAX_ERROR_BODY = 2048


class RemoteError(ModelError):
    """The server could not give a reply. ``code`` is the ``error`` event's code."""

    def __init__(self, message: str, code: str = "backbone_unavailable") -> None:
        super().__init__(message)
        self.code = code


class Retryable(Exception):
    """One attempt failed in a way that another attempt may not (connection, timeout, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def read_api_key(cfg: Any, environ: dict[str, str] | None = None) -> str | None:
    """The API key from ``api_key_file`` (first line) or the ``api_key_env`` variable; None for none."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        try:
            key = path.read_text().strip().splitlines()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ModelError(f"remote: cannot read api_key_file {path}: {exc}") from exc
        if not key or not key[0].strip():
            raise ModelError(f"remote: api_key_file {path} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("remote_key_file_open", path=str(path), mode=oct(mode & 0o777), advice="chmod 600")
        return key[0].strip()
    env = os.environ if environ is None else environ
    return env.get(cfg.api_key_env) or None if cfg.api_key_env else None


# -- health -----------------------------------------------------------------------------------------
class Health:
    """What ``status`` shows of the server: updated by requests and probes (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "unknown"  # unknown | ok | retrying | down
        self.last_ok_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failures = 0  # consecutive
        self.requests = 0
        self.retries = 0
        self.first_byte_s: float | None = None

    def ok(self, first_byte_s: float | None = None) -> None:
        with self._lock:
            self.state, self.failures, self.last_ok_at = "ok", 0, time.time()
            if first_byte_s is not None:
                self.first_byte_s = round(first_byte_s, 3)

    def failed(self, error: str, down: bool) -> None:
        with self._lock:
            self.state = "down" if down else "retrying"
            self.failures += 1
            self.last_error, self.last_error_at = error, time.time()

    def last_contact(self) -> float:
        return max(self.last_ok_at or 0.0, self.last_error_at or 0.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"health": self.state, "last_ok_at": self.last_ok_at, "last_error": self.last_error,
                    "last_error_at": self.last_error_at, "consecutive_failures": self.failures,
                    "requests": self.requests, "retries": self.retries, "first_byte_s": self.first_byte_s}


# -- HTTP -------------------------------------------------------------------------------------------
class Http:
    """One request per connection, stdlib only; ``cancel`` shuts the socket from a watcher thread."""

    def __init__(self, cfg: Any, key: str | None) -> None:
        url = urlsplit(cfg.base_url)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.root = url.path.rstrip("/")
        self.cfg = cfg
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "User-Agent": "agentd"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def _connect(self, read_timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        kw: dict[str, Any] = {"context": ssl.create_default_context()} if self.https else {}
        conn = cls(self.host, self.port, timeout=self.cfg.connect_timeout_s, **kw)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Retryable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        assert conn.sock is not None
        conn.sock.settimeout(read_timeout)
        return conn

    def get_json(self, path: str, timeout: float) -> Any:
        conn = self._connect(timeout)
        try:
            conn.request("GET", self.root + path, headers={k: v for k, v in self.headers.items() if k != "Accept"})
            resp = conn.getresponse()
            body = resp.read(1 << 20)
            if resp.status != 200:
                raise Retryable(f"GET {path}: HTTP {resp.status}")
            return json.loads(body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise Retryable(f"GET {path}: {exc}") from exc
        finally:
            conn.close()

    def stream(self, path: str, body: dict[str, Any], cancel: threading.Event | None) -> Iterator[bytes]:
        """The response's lines, as they arrive. Raises Retryable or RemoteError (not retried)."""
        conn = self._connect(self.cfg.read_timeout_s)
        done = threading.Event()
        sock = conn.sock

        def watch() -> None:  # a blocked recv wakes only when its socket is shut down
            while not done.wait(0.05):
                if cancel is not None and cancel.is_set():
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
                    except OSError:
                        pass
                    return

        watcher = threading.Thread(target=watch, name="remote-cancel", daemon=True)
        watcher.start()
        try:
            try:
                conn.request("POST", self.root + path, body=json.dumps(body).encode(), headers=self.headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise Retryable(f"POST {path}: {type(exc).__name__}: {exc}") from exc
            if resp.status != 200:
                detail = resp.read(_MAX_ERROR_BODY).decode("utf-8", errors="replace").strip()
                msg = f"POST {path}: HTTP {resp.status} {resp.reason}" + (f": {detail[:300]}" if detail else "")
                if resp.status in _RETRY_STATUS:
                    raise Retryable(msg, retry_after(resp.getheader("Retry-After")))
                raise RemoteError(msg, code="backbone_error")
            while True:
                try:
                    line = resp.readline(1 << 20)
                except (OSError, http.client.HTTPException) as exc:
                    if cancel is not None and cancel.is_set():
                        return
                    raise Retryable(f"stream broken: {type(exc).__name__}: {exc}") from exc
                if not line:
                    return
                yield line
        finally:
            done.set()
            conn.close()


def public_url(url: str) -> str:
    """``url`` without any ``user:password@`` in it: what logs and ``status`` may show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
