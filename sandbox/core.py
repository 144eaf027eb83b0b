"""Daemon side of the sandbox: the warm fork server, ``arun``/``run``, counters.

One fork server per process (started on first use, restarted if it dies) serves every ``Limits``: the
limits travel with each request and are applied in the freshly forked child, so nothing is shared
between runs but the untouched template image. The daemon never waits on the code: every byte is
read from non-blocking pipes on the event loop, and a supervisor outside the child's namespaces owns
the wall clock, with a backstop here in case the supervisor itself goes missing.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from .errors import SandboxError
from .limits import DEFAULT_IMPORTS, ExecResult, Limits

log = structlog.get_logger("sandbox")

RUNNER = Path(__file__).with_name("_runner.py")
BACKSTOP_S = 5.0  # past wall_s, how long we wait for the supervisor before killing it ourselves
DRAIN_GRACE_S = 0.5  # after the exit report, how long pipes may stay open (holders without a PID ns)


def _site_dir() -> str:
    import RestrictedPython

    return str(Path(RestrictedPython.__file__).resolve().parent.parent)


class ForkServer:
    """The warm template process (sandbox/_runner.py) and our end of its request channel."""

    def __init__(self, preload: tuple[str, ...] = DEFAULT_IMPORTS) -> None:
        self.preload = preload
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: socket.socket | None = None
        self.root = False
        self.starts = 0

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-B", "-S", str(RUNNER), _site_dir(), ",".join(self.preload)]
        try:
            # env={}: nothing of the daemon's environment (secrets) reaches the template or its forks.
            # start_new_session instead of preexec_fn: safe in a threaded daemon.
            self._proc = subprocess.Popen(argv, stdin=child, stdout=subprocess.DEVNULL, env={}, cwd="/",
                                          close_fds=True, start_new_session=True)
        finally:
            child.close()
        parent.settimeout(30.0)
        try:
            hello = json.loads(parent.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            self._proc.kill()
            raise SandboxError(f"sandbox fork server did not start: {exc}") from exc
        if not hello.get("ready"):
            self._proc.kill()
            raise SandboxError("sandbox fork server did not start (no ready message)")
        parent.settimeout(None)
        self._chan = parent
        self.root = bool(hello.get("root"))
        self.starts += 1
        log.info("sandbox_server_started", pid=self._proc.pid, root=self.root, starts=self.starts)

    def ensure(self) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    log.warning("sandbox_server_died", returncode=self._proc.returncode)
                self._start()

    def submit(self, fds: list[int]) -> None:
        """Hand one run's fds (control socket, stdout, stderr write ends) to the server."""
        for attempt in (0, 1):
            self.ensure()
            with self._lock:
                assert self._chan is not None
                try:
                    self._chan.sendmsg([b"run"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    return
                except OSError as exc:
                    if attempt:
                        raise SandboxError(f"sandbox fork server unreachable: {exc}") from exc
                    if self._proc is not None:
                        self._proc.kill()
                        self._proc.wait()

    def close(self) -> None:
        with self._lock:
            if self._chan is not None:
                self._chan.close()  # EOF: the server exits; running supervisors see their own EOFs
                self._chan = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


_server = ForkServer()
_stats_lock = threading.Lock()
_stats: dict[str, Any] = {"runs": 0, "timeouts": 0, "errors": 0, "limits": Counter()}


def stats() -> dict[str, Any]:
    """Counters since import: runs, timeouts, infrastructure errors, limits hit by kind."""
    with _stats_lock:
        return {"runs": _stats["runs"], "timeouts": _stats["timeouts"], "errors": _stats["errors"],
                "limits_hit": dict(_stats["limits"]), "server_starts": _server.starts}


def _count(result: ExecResult | None) -> None:
    with _stats_lock:
        if result is None:
            _stats["errors"] += 1
            return
        _stats["runs"] += 1
        _stats["timeouts"] += int(result.timed_out)
        if result.limit:
            _stats["limits"][result.limit] += 1


def shutdown() -> None:
    """Stop the fork server (runs in flight are killed by their supervisors)."""
    _server.close()


async def arun(code: str, limits: Limits = Limits(), exec_id: str = "") -> ExecResult:  # noqa: B008
    """Run ``code`` in a fresh sandboxed child; never raises for anything the code does.

    Raises :class:`SandboxError` only when the machinery itself fails. Cancelling the awaiting task
    kills the run.
    """
    loop = asyncio.get_running_loop()
    if _server._chan is None or _server._proc is None or _server._proc.poll() is not None:
        await asyncio.to_thread(_server.ensure)  # first start costs ~100 ms; never on the loop thread
    exec_id = exec_id or uuid.uuid4().hex[:12]
    ctrl, ctrl_remote = socket.socketpair()
    out_r, out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(out_w, True)
    os.set_blocking(err_w, True)
    t0 = time.monotonic()
    try:
        try:
            _server.submit([ctrl_remote.fileno(), out_w, err_w])
        finally:
            ctrl_remote.close()
            os.close(out_w)
            os.close(err_w)
        ctrl.setblocking(False)
        request = {"run_id": f"{os.getpid()}-{exec_id}", "code": code, "limits": limits.to_wire()}
        await loop.sock_sendall(ctrl, (json.dumps(request) + "\n").encode())
        result = await _collect(loop, ctrl, out_r, err_r, limits, t0)
    except SandboxError:
        _count(None)
        raise
    except OSError as exc:
        _count(None)
        raise SandboxError(f"sandbox run failed: {exc}") from exc
    finally:
        ctrl.close()  # on cancellation too: the supervisor reads EOF and kills the run
        for fd in (out_r, err_r):
            try:
                loop.remove_reader(fd)
            except (ValueError, RuntimeError):
                pass
            os.close(fd)
    result.exec_id = exec_id
    _count(result)
    log.info("sandbox_run", exec_id=exec_id, exit_code=result.exit_code, limit=result.limit,
             timed_out=result.timed_out, cpu_s=result.cpu_s, wall_s=result.wall_s, truncated=result.truncated)
    return result


async def _collect(loop: asyncio.AbstractEventLoop, ctrl: socket.socket, out_r: int, err_r: int,
                   limits: Limits, t0: float) -> ExecResult:
    cap = limits.max_output_bytes
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    pipes_done = loop.create_future()
    truncated = False
    kill_sent = False

    def on_readable(fd: int) -> None:
        nonlocal truncated, kill_sent
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(fd)
            open_fds.discard(fd)
            if not open_fds and not pipes_done.done():
                pipes_done.set_result(None)
            return
        buf = bufs[fd]
        room = cap - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            truncated = True
            if not kill_sent:  # past the cap the run ends: the model gets what fits, the machine its CPU
                kill_sent = True
                try:
                    ctrl.send(b'{"kill": "output"}\n')
                except OSError:
                    pass

    for fd in (out_r, err_r):
        loop.add_reader(fd, on_readable, fd)

    report: dict[str, Any] = {}
    started: dict[str, Any] = {}
    pending = bytearray()
    deadline = t0 + limits.wall_s + BACKSTOP_S
    while "event" not in report:
        left = deadline - time.monotonic()
        if left <= 0:
            _backstop_kill(started)
            raise SandboxError("sandbox supervisor did not report within the backstop; run killed")
        try:
            data = await asyncio.wait_for(loop.sock_recv(ctrl, 1 << 16), timeout=left)
        except TimeoutError:
            continue
        if not data:
            raise SandboxError("sandbox supervisor closed without a result")
        pending += data
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending = bytearray(rest)
            msg = json.loads(line)
            if msg.get("event") == "started":
                started = msg
            elif msg.get("event") == "exit":
                report = msg
            elif msg.get("event") == "error":
                raise SandboxError(f"sandbox set-up failed, code not run: {msg.get('message')}")
    try:
        await asyncio.wait_for(asyncio.shield(pipes_done), timeout=DRAIN_GRACE_S)
    except TimeoutError:
        pass  # a process outside our reach still holds the pipe: keep what we have
    if not pipes_done.done():
        pipes_done.cancel()
    limit = report.get("limit")
    if truncated:
        limit = limit if limit in ("wall",) else "output"
    return ExecResult(
        stdout=bufs[out_r].decode("utf-8", "replace"),
        stderr=bufs[err_r].decode("utf-8", "replace"),
        exit_code=int(report.get("exit_code", -1)),
        timed_out=bool(report.get("timed_out")),
        limit=limit,
        cpu_s=float(report.get("cpu_s", 0.0)),
        peak_rss_mb=float(report.get("peak_rss_mb", 0.0)),
        truncated=truncated,
        wall_s=round(time.monotonic() - t0, 4),
        layers=dict(report.get("layers", {})),
    )


def _backstop_kill(started: dict[str, Any]) -> None:
    pid = started.get("pid")
    if isinstance(pid, int) and pid > 1:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    log.error("sandbox_backstop_kill", pid=pid)


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-run")
_tls = threading.local()


def _thread_runner() -> asyncio.Runner:
    runner = getattr(_tls, "runner", None)
    if runner is None:
        runner = _tls.runner = asyncio.Runner()
    return runner


def run(code: str, limits: Limits = Limits(), exec_id: str = "") -> ExecResult:  # noqa: B008
    """Blocking twin of :func:`arun`; safe to call from inside a running event loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _thread_runner().run(arun(code, limits, exec_id))
    return _pool.submit(lambda: _thread_runner().run(arun(code, limits, exec_id))).result()


_probe: dict[str, bool] | None = None


def available_layers(limits: Limits = Limits()) -> dict[str, bool]:  # noqa: B008
    """The isolation layers that apply on this host (a harmless probe run, cached)."""
    global _probe
    if _probe is None:
        _probe = run("pass", limits.replace(wall_s=30.0)).layers
    return dict(_probe)
