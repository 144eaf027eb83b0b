"""The daemon's side of EXEC: approval gate, events, counters, the ``exec.approve`` op, ``status``.

One ``SandboxService`` per daemon, an async context manager (``async with SandboxService(section,
publish) as svc``: entering starts the fork server and probes the layers; leaving denies pending
approvals and stops it). The daemon calls it at a few points:

- the loop's EXEC hook: ``result = await svc.execute(code, turn)`` publishes ``exec`` (with
  ``approval: "pending"`` under ``approve = "ask"``) and ``exec_result`` events and returns the
  ``ExecResult`` (the agent renders the RESULT text with ``models.transcript``). It never
  raises for the code or the sandbox machinery: a refusal, a limit or a broken fork server is a result
  the model sees;
- the socket op ``exec.approve`` (``exec_id``, ``approve``): ``await svc.handle(op, request)``
  returns the ``done`` result or raises ``SandboxOpError(code, message)``;
- ``status``: ``svc.status()`` is the ``sandbox`` section;
- shutdown: ``await svc.aclose()`` denies pending approvals and stops the fork server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from . import core
from .errors import SandboxError
from .limits import ExecResult, Limits

log = structlog.get_logger("sandbox.service")

Publish = Callable[[dict[str, Any]], Any]


class SandboxOpError(SandboxError):
    """A bad ``exec.approve`` request; ``code`` is a protocol error code (docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SandboxService:
    def __init__(self, section: Any, publish: Publish | None = None) -> None:
        """``section``: ``agentd.config.SandboxSection``; ``publish(event)`` puts an event on the bus."""
        self.section = section
        self.limits = Limits.from_config(section)
        self.approve_mode: str = section.approve
        self.approve_timeout_s: float = float(section.approve_timeout_s)
        self.enabled: bool = bool(section.enabled)
        self._publish = publish
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._layers: dict[str, bool] | None = None
        self.counts: Counter[str] = Counter()
        self.limits_hit: Counter[str] = Counter()
        self.last_run_at: float | None = None

    def _emit(self, event: dict[str, Any]) -> None:
        if self._publish is None:
            return
        try:
            out = self._publish(event)
            if asyncio.iscoroutine(out):
                asyncio.get_running_loop().create_task(out)
        except Exception:  # noqa: BLE001 - a broken subscriber must not turn into an EXEC failure
            log.exception("sandbox_publish_failed", event_kind=event.get("event"))

    async def execute(self, code: str, turn: int = 0, exec_id: str | None = None) -> ExecResult:
        """Gate, run and report one EXEC. Always returns a result."""
        exec_id = exec_id or uuid.uuid4().hex[:12]
        base = {"turn": turn, "exec_id": exec_id}
        self.counts["requested"] += 1
        if not self.enabled:
            return self._finish(base, _refused(exec_id, "disabled", "EXEC is disabled ([sandbox] enabled = false)."))
        if self.approve_mode == "never":
            self._emit({"event": "exec", **base, "code": code})
            return self._finish(base, _refused(exec_id, "denied", "EXEC refused: [sandbox] approve = \"never\"."))
        if self.approve_mode == "ask":
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._pending[exec_id] = fut
            self._emit({"event": "exec", **base, "code": code, "approval": "pending"})
            log.info("sandbox_approval_pending", exec_id=exec_id, timeout_s=self.approve_timeout_s)
            try:
                approved = await asyncio.wait_for(fut, self.approve_timeout_s)
                why = "EXEC denied by a client (exec.approve)."
            except TimeoutError:
                approved = False
                why = f"EXEC denied: no client approved it within {self.approve_timeout_s:g} s."
            finally:
                self._pending.pop(exec_id, None)
            if not approved:
                return self._finish(base, _refused(exec_id, "denied", why))
        else:
            self._emit({"event": "exec", **base, "code": code})
        try:
            result = await core.arun(code, self.limits, exec_id=exec_id)
        except SandboxError as exc:
            log.error("sandbox_run_failed", exec_id=exec_id, error=str(exc))
            self.counts["errors"] += 1
            result = ExecResult(stderr=f"sandbox error: {exc}\n", exit_code=-1, exec_id=exec_id)
        return self._finish(base, result)

    def _finish(self, base: dict[str, Any], result: ExecResult) -> ExecResult:
        self.counts["runs" if result.limit not in ("denied", "disabled") else "refused"] += 1
        if result.timed_out:
            self.counts["timeouts"] += 1
        if result.limit:
            self.limits_hit[result.limit] += 1
        self.last_run_at = time.time()
        self._emit({"event": "exec_result", **base, **result.event_fields()})
        return result

    def approve(self, exec_id: str, approve: bool) -> bool:
        """Resolve a pending EXEC; False when no EXEC with that id is waiting."""
        fut = self._pending.get(exec_id)
        if fut is None or fut.done():
            return False
        fut.set_result(bool(approve))
        log.info("sandbox_approval", exec_id=exec_id, approved=bool(approve))
        return True

    async def handle(self, op: str, req: Mapping[str, Any]) -> dict[str, Any]:
        """The ``exec.approve`` op."""
        if op != "exec.approve":
            raise SandboxOpError("unknown_op", f"unknown op {op!r}")
        exec_id, approve = req.get("exec_id"), req.get("approve")
        if exec_id is None or approve is None:
            raise SandboxOpError("missing_field", "exec.approve needs exec_id and approve")
        if not isinstance(exec_id, str) or not isinstance(approve, bool):
            raise SandboxOpError("bad_field", "exec_id must be a string and approve a boolean")
        if not self.approve(exec_id, approve):
            raise SandboxOpError("bad_field", f"no EXEC {exec_id!r} is waiting for approval")
        return {"exec_id": exec_id, "approved": approve}

    async def layers(self) -> dict[str, bool]:
        """Layers that apply on this host, probed once with a harmless run."""
        if self._layers is None:
            try:
                self._layers = await asyncio.to_thread(core.available_layers, self.limits)
            except SandboxError as exc:
                log.error("sandbox_probe_failed", error=str(exc))
                return {}
        return dict(self._layers)

    def status(self) -> dict[str, Any]:
        s = core.stats()
        return {
            "enabled": self.enabled,
            "approve": self.approve_mode,
            "layers": dict(self._layers or {}),
            "runs": self.counts["runs"],
            "refused": self.counts["refused"],
            "timeouts": self.counts["timeouts"],
            "errors": self.counts["errors"],
            "limits_hit": dict(self.limits_hit),
            "pending_approvals": sorted(self._pending),
            "server_starts": s["server_starts"],
            "limits": {k: v for k, v in self.limits.to_wire().items() if k not in ("cpu_soft", "allowed_imports")},
        }

    async def __aenter__(self) -> SandboxService:
        if self.enabled:
            await self.layers()  # starts the fork server, so the first EXEC is as fast as the rest
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Deny pending approvals and stop the fork server; safe to call twice."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(False)
        await asyncio.to_thread(core.shutdown)


def _refused(exec_id: str, limit: str, message: str) -> ExecResult:
    return ExecResult(stderr=message + "\n", exit_code=-1, limit=limit, exec_id=exec_id)
