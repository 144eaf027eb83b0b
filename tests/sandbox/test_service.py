"""The daemon's EXEC path without a daemon: approval gate, events, status, failures as results."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from agentd.config import SandboxSection
from models import transcript
from sandbox import SandboxError
from sandbox.service import SandboxOpError, SandboxService


class Events(list[dict[str, Any]]):
    """The published events, with a wakeup for tests that wait for the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def publish(self, event: dict[str, Any]) -> None:
        self.append(event)
        self.arrived.set()


def make(**kw: Any) -> tuple[SandboxService, Events]:
    events = Events()
    return SandboxService(SandboxSection(**kw), events.publish), events


async def test_auto_runs_and_publishes_exec_then_result() -> None:
    svc, events = make(approve="auto")
    r = await svc.execute("print(6 * 7)", turn=3)
    assert r.stdout == "42\n" and r.ok
    assert [e["event"] for e in events] == ["exec", "exec_result"]
    assert events[0] == {"event": "exec", "turn": 3, "exec_id": r.exec_id, "code": "print(6 * 7)"}
    assert events[1]["stdout"] == "42\n" and events[1]["exec_id"] == r.exec_id and events[1]["limit"] is None
    assert transcript.exec_result_text(r.stdout, r.stderr, r.exit_code, r.timed_out, r.limit) == "42"
    st = svc.status()
    assert st["runs"] == 1 and st["approve"] == "auto" and st["limits"]["wall_s"] == 10.0


async def test_limits_are_results_the_model_sees() -> None:
    svc, events = make(wall_s=1.0)
    r = await svc.execute("while True: pass")
    assert r.timed_out and r.limit == "wall"
    obs = transcript.exec_result_text(r.stdout, r.stderr, r.exit_code, r.timed_out, r.limit)
    assert obs == "error: timed out"
    assert events[-1]["timed_out"] is True and svc.status()["limits_hit"] == {"wall": 1}
    r = await svc.execute("print(().__class__)")
    assert r.limit == "policy" and "invalid attribute name" in r.stderr


async def test_never_refuses_with_a_result() -> None:
    svc, events = make(approve="never")
    r = await svc.execute("print(1)")
    assert r.limit == "denied" and r.stdout == "" and "never" in r.stderr
    assert events[-1]["event"] == "exec_result" and events[-1]["limit"] == "denied"
    assert svc.status()["refused"] == 1 and svc.status()["runs"] == 0


async def test_disabled() -> None:
    svc, _ = make(enabled=False)
    r = await svc.execute("print(1)")
    assert r.limit == "disabled" and r.stdout == ""


async def test_ask_waits_for_exec_approve() -> None:
    svc, events = make(approve="ask", approve_timeout_s=10.0)
    task = asyncio.create_task(svc.execute("print('approved')", turn=1))
    await asyncio.wait_for(events.arrived.wait(), 10)
    ev = events[0]
    assert ev["event"] == "exec" and ev["approval"] == "pending" and not task.done()
    assert svc.status()["pending_approvals"] == [ev["exec_id"]]
    done = await svc.handle("exec.approve", {"exec_id": ev["exec_id"], "approve": True})
    assert done == {"exec_id": ev["exec_id"], "approved": True}
    r = await task
    assert r.stdout == "approved\n" and svc.status()["pending_approvals"] == []


async def test_ask_denied_by_client_and_by_timeout() -> None:
    svc, events = make(approve="ask", approve_timeout_s=10.0)
    task = asyncio.create_task(svc.execute("print('x')"))
    await asyncio.wait_for(events.arrived.wait(), 10)
    await svc.handle("exec.approve", {"exec_id": events[0]["exec_id"], "approve": False})
    r = await task
    assert r.limit == "denied" and r.stdout == "" and "denied by a client" in r.stderr

    svc, _ = make(approve="ask", approve_timeout_s=0.2)
    r = await svc.execute("print('x')")
    assert r.limit == "denied" and "within 0.2 s" in r.stderr


async def test_exec_approve_errors() -> None:
    svc, _ = make(approve="ask")
    with pytest.raises(SandboxOpError) as e:
        await svc.handle("exec.approve", {"exec_id": "nope", "approve": True})
    assert e.value.code == "bad_field"
    with pytest.raises(SandboxOpError) as e:
        await svc.handle("exec.approve", {"exec_id": "x"})
    assert e.value.code == "missing_field"
    with pytest.raises(SandboxOpError) as e:
        await svc.handle("exec.approve", {"exec_id": "x", "approve": "yes"})
    assert e.value.code == "bad_field"


async def test_machinery_failure_is_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox import core

    async def broken(*a: Any, **kw: Any) -> Any:
        raise SandboxError("fork server gone")

    monkeypatch.setattr(core, "arun", broken)
    svc, events = make()
    r = await svc.execute("print(1)")
    assert r.exit_code == -1 and "fork server gone" in r.stderr and events[-1]["event"] == "exec_result"
    assert svc.status()["errors"] == 1


async def test_context_manager_probe_and_config_keys() -> None:
    events = Events()
    async with SandboxService(SandboxSection(), events.publish) as svc:
        layers = svc.status()["layers"]
        assert layers["rlimits"] and "pid_ns" in layers and await svc.layers() == layers
        assert (await svc.execute("print(1)")).stdout == "1\n"
    await svc.aclose()  # twice is fine
    assert {f.name for f in dataclasses.fields(SandboxSection)} >= {
        "approve", "approve_timeout_s", "wall_s", "cpu_s", "memory_mb", "max_output_bytes", "max_file_bytes",
        "max_open_files", "max_processes", "network", "restricted", "user", "allowed_imports"}
