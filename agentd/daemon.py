"""The daemon: ``Daemon(config).serve()`` runs startup, the loop, and a staged shutdown.

Lifecycle (``DaemonState``): INITIALIZING -> STARTING -> RUNNING -> STOPPING -> STOPPED.
  startup   lock (one daemon per run_dir), backbone, memory + newest valid snapshot, sandbox,
            socket, READY=1 to systemd, the agent loop and the watchdog
  running   signal handlers only set flags: SIGTERM/SIGINT stop, SIGHUP reloads what can be
  shutdown  stop taking input; let the current turn end (bounded); final snapshot; close the
            parts; remove the socket; release the lock. Each stage runs under a timeout.

How parts plug in (one wiring place each, in ``_start_parts`` and ``_register_ops``):
  - an async context manager entered on ``self.stack`` (closed in reverse order at shutdown),
  - socket ops via ``self.server.register_op(name, handler)`` (handler(conn, request) -> result),
  - loop hooks on ``self.agent``: ``memory`` (recall in HOLD, remember, snapshot in PAUSE),
    ``executor`` (EXEC), ``on_pause`` callbacks, ``put(Observation)`` for new input,
  - a ``status`` section via ``self.status_sections[name] = callable`` (sync or async).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch

import models
from agentd import config as config_mod
from agentd import log as log_mod
from agentd.agent import Agent, Observation, TurnError
from agentd.breath import BreathClock, Phase
from agentd.config import Config, ConfigError
from agentd.events import EventBus
from agentd.notify import Notifier
from agentd.senses import SenseService
from agentd.server import Connection, OpError, Server, field

log = structlog.get_logger("agentd.daemon")
VERSION = "0.1.0"
BUNDLED_CHECKPOINTS = Path(models.__file__).parent / "checkpoints"


class DaemonState(enum.StrEnum):
    INITIALIZING = "initializing"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StartupError(Exception):
    """Start-up cannot go on (another daemon runs, a bad checkpoint...); exit status 1."""


def load_backbone(config: Config) -> tuple[models.Backbone, str]:
    """The configured backbone and where it came from: a checkpoint directory, the bundled
    default for its name, or deterministic random weights (seeded, so a restart gets the same)."""
    b = config.backbone
    ckpt = Path(b.checkpoint).expanduser() if b.checkpoint else None
    if ckpt is None and not b.options and (BUNDLED_CHECKPOINTS / b.name / "config.json").exists():
        ckpt = BUNDLED_CHECKPOINTS / b.name
    if ckpt is not None:
        return models.load_checkpoint(ckpt, expect=b.name), str(ckpt)
    torch.manual_seed(b.seed)
    return models.build(b.name, **b.options), f"random(seed={b.seed})"


class Daemon:
    def __init__(self, config: Config, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.state = DaemonState.INITIALIZING
        self.notifier = Notifier(environ)
        self.bus = EventBus(config.socket.client_queue)
        self.server = Server(config.socket_path, config.socket_mode, config.socket.max_line_bytes, config.socket.client_queue)
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self.stack = contextlib.AsyncExitStack()
        self.started_at = time.time()
        self.agent: Agent | None = None
        self.backbone: models.Backbone | None = None
        self.backbone_source = ""
        self._lock_fd: int | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._exit_code = 0
        self._senses: SenseService | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def serve(self) -> int:
        """Run until stopped; the process exit status."""
        try:
            await self.startup()
        except StartupError as exc:
            log.error("startup_failed", error=str(exc))
            await self.shutdown()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self._stop.wait()
        await self.shutdown()
        return self._exit_code

    def request_stop(self, reason: str = "request") -> None:
        if not self._stop.is_set():
            log.info("stop_requested", reason=reason)
            self._stop.set()

    def request_reload(self) -> None:
        asyncio.get_running_loop().call_soon(self.reload)

    async def startup(self) -> None:
        cfg = self.config
        self.state = DaemonState.STARTING
        self._take_lock()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.daemon.torch_threads:
            torch.set_num_threads(cfg.daemon.torch_threads)
        try:
            self.backbone, self.backbone_source = await asyncio.to_thread(load_backbone, cfg)
        except models.ModelError as exc:
            raise StartupError(f"cannot load backbone {cfg.backbone.name!r}: {exc}") from exc
        backbone_status = getattr(self.backbone, "status_section", None)
        if callable(backbone_status):  # a backbone with a life of its own (remote: endpoint and health)
            self.status_sections[cfg.backbone.name] = backbone_status
        clock = BreathClock(cfg.breath, self._on_phase)
        self.agent = Agent(cfg, self.backbone, self.bus, clock)
        await self._start_parts()
        self._register_ops()
        try:
            await self.server.start()
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"cannot serve the socket {cfg.socket_path}: {exc}") from exc
        self._tasks.append(asyncio.create_task(self._run_agent(), name="agent"))
        if self.notifier.watchdog_s:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self.state = DaemonState.RUNNING
        self.notifier.send("READY=1")
        self.notifier.send(f"STATUS=running, backbone {cfg.backbone.name}")
        log.info("daemon_started", pid=os.getpid(), socket=str(cfg.socket_path), backbone=cfg.backbone.name,
                 weights=self.backbone_source, parameters=models.count_parameters(self.backbone),
                 position=self.agent.state.meta.position, version=VERSION)

    async def _start_parts(self) -> None:
        """Memory (with the newest snapshot), the sandbox when configured, and the senses."""
        cfg, agent = self.config, self.agent
        assert agent is not None and self.backbone is not None
        from agentd.memory_service import MemoryService

        memory = await self.stack.enter_async_context(MemoryService(cfg))
        agent.memory = memory
        self.status_sections["memory"] = memory.status
        snap = await asyncio.to_thread(memory.restore, self.backbone)
        if snap is not None:
            agent.restore(snap.state, snap.context, snap.clock)
            log.info("state_restored", seq=snap.seq, position=snap.state.meta.position, turns=agent.turns)
        if cfg.sandbox.enabled:
            from sandbox.service import SandboxService

            sandbox = await self.stack.enter_async_context(SandboxService(cfg.sandbox, agent.emit))
            agent.executor = sandbox
            self.status_sections["sandbox"] = sandbox.status
            self._sandbox = sandbox

        senses = await self.stack.enter_async_context(SenseService(cfg, agent, self.bus))
        self.status_sections["soma"] = senses.status
        self.status_sections["mqtt"] = senses.mqtt_link
        self._senses = senses

    def _register_ops(self) -> None:
        s = self.server
        s.register_op("status", self._op_status)
        s.register_op("chat", self._op_chat)
        s.register_op("cancel", self._op_cancel)
        s.register_op("subscribe", self._op_subscribe)
        assert self.agent is not None
        memory = self.agent.memory
        if memory is not None:
            for op in memory.OPS:  # type: ignore[attr-defined]
                s.register_op(op, self._wrap_part(memory.handle))  # type: ignore[attr-defined]
        sandbox = getattr(self, "_sandbox", None)
        if sandbox is not None:
            s.register_op("exec.approve", self._wrap_part(sandbox.handle))
        if self._senses is not None:
            s.register_op("condition", self._wrap_part(self._senses.handle))

    def _wrap_part(self, handle: Callable[..., Any]) -> Callable[[Connection, dict[str, Any]], Any]:
        """Adapt a part's ``handle(op, request)`` (raising its own error with ``code``) to an op handler."""

        async def handler(conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
            try:
                return await handle(req["op"], req)
            except Exception as exc:
                if hasattr(exc, "code") and hasattr(exc, "message"):
                    raise OpError(exc.code, exc.message) from exc
                raise

        return handler

    async def _run_agent(self) -> None:
        assert self.agent is not None
        try:
            await self.agent.run()
        except Exception:
            log.exception("agent_loop_crashed")
            self._exit_code = 1
            self.request_stop("agent loop crashed")

    async def _watchdog(self) -> None:
        # Pinged from the event loop itself: a blocked loop stops the pings and systemd restarts us.
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(self.notifier.watchdog_s / 2)

    def _on_phase(self, phase: Phase, breath: int) -> None:
        self.bus.publish({"event": "phase", "phase": phase.value, "breath": breath})
        if self.notifier.enabled:
            self.notifier.send(f"STATUS={phase.value} (breath {breath})")

    async def shutdown(self) -> None:
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self.state = DaemonState.STOPPING
        self.notifier.send("STOPPING=1")
        timeout = self.config.daemon.shutdown_timeout_s
        self.server.accepting = False
        agent = self.agent
        if agent is not None:
            agent.stop()
            agent_task = next((t for t in self._tasks if t.get_name() == "agent"), None)
            if agent_task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(agent_task), timeout / 2)
                except TimeoutError:
                    agent.cancel()  # the turn did not end in time: interrupt it
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(agent_task, timeout / 4)
            if agent.memory is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(agent.memory.snapshot(agent.state, list(agent.context), agent.clock_dict()), timeout / 4)  # type: ignore[attr-defined]
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.stack.aclose(), timeout / 2)
        except TimeoutError:
            log.error("shutdown_parts_timeout")
        await self.server.stop()
        self._release_lock()
        self.state = DaemonState.STOPPED
        log.info("daemon_stopped", uptime_s=round(time.time() - self.started_at, 1))

    # -- single instance ------------------------------------------------------------------------
    def _take_lock(self) -> None:
        run_dir = self.config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.config.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StartupError(f"agentd is already running (pid {other or '?'}; lock {self.config.lock_path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply log level and breath timings, name the rest."""
        try:
            new = config_mod.load(self.config.source or None)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        log_mod.set_level(new.daemon.log_level)
        if self.agent is not None:
            self.agent.clock.section = new.breath
        needs_restart = [name for name in config_mod.SECTIONS if name not in ("breath",)
                         and getattr(new, name) != getattr(self.config, name)
                         and not (name == "daemon" and _only_log_level_changed(self.config, new))]
        self.config = config_mod.replace(config_mod.replace(self.config, "breath", **vars(new.breath)),
                                         "daemon", log_level=new.daemon.log_level)
        log.info("config_reloaded", applied=["daemon.log_level", "breath"], needs_restart=needs_restart)

    # -- ops ------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        agent = self.agent
        out: dict[str, Any] = {
            "state": self.state.value,
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "backbone": self.config.backbone.name,
            "weights": self.backbone_source,
            "clients": len(self.server.connections),
            "requests": self.server.requests,
            "errors": self.server.errors,
            "dropped_events": self.server.dropped + self.bus.dropped,
        }
        if agent is not None:
            out.update({
                "phase": agent.clock.phase.value,
                "breath": agent.clock.breath,
                "turns": agent.turns,
                "in_turn": agent.in_turn,
                "inbox": len(agent.inbox),
                "position": agent.state.meta.position,
                "state_digest": await asyncio.to_thread(models.state_digest, agent.state),
            })
        for name, fn in self.status_sections.items():
            try:
                section = fn()
                out[name] = await section if asyncio.iscoroutine(section) else section
            except Exception as exc:  # a broken part must not break status
                out[name] = {"error": str(exc)}
        return out

    async def _op_status(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        return await self.status()

    async def _op_chat(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        text = field(req, "text", str)
        if not text.strip():
            raise OpError("bad_field", "'text' must not be empty")
        if self.state is not DaemonState.RUNNING or self.agent is None:
            raise OpError("shutting_down", "agentd is stopping")
        rid = req.get("id")
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        listener = (lambda ev: conn.send({**ev, "id": rid})) if rid is not None else None
        self.agent.put(Observation("chat", text, source=f"socket:{conn.peer.get('pid', '?')}", listener=listener, done=done))
        try:
            return await done
        except TurnError as exc:  # the turn failed: one terminal error event, with the backbone's code
            raise OpError(exc.code, exc.message) from None

    async def _op_cancel(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        return {"cancelled": self.agent.cancel() if self.agent is not None else False}

    async def _op_subscribe(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        sub = self.bus.subscribe(maxsize=self.config.socket.client_queue, name=f"client:{conn.peer.get('pid', '?')}")
        conn.subscriptions.append(sub)

        async def forward() -> None:
            while True:
                conn.send(await sub.get())

        task = asyncio.create_task(forward())
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)
        return {"subscribed": True}


def _only_log_level_changed(old: Config, new: Config) -> bool:
    return config_mod.replace(old, "daemon", log_level=new.daemon.log_level).daemon == new.daemon
