"""The loop's routing, pinned with a scripted test-double backbone in a real daemon subprocess.

The double (tests/plugins/agentd_scripted.py, an ``agentd.backbones`` entry point) writes EXEC code
then SPEAKs and WAITs, so these tests see the whole path: EXEC through the real sandbox, the RESULT
fed back, the SPEAK streamed, the turn's single done, the loop guards, and a hostile EXEC that the
daemon survives while answering ``status``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agentd.client import Client

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")


def scripted(daemon_factory: Any, sandbox: dict[str, Any] | None = None, agent: dict[str, Any] | None = None,
             **options: Any) -> Any:
    extra = {"sandbox": {"enabled": True, "wall_s": 5.0, "cpu_s": 2.0, **(sandbox or {})}, "agent": agent or {}}
    return daemon_factory(extra, env={"PYTHONPATH": PLUGINS},
                          backbone={"name": "scripted", "max_tokens": 256, "options": options})


async def chat_events(sock: Path, text: str) -> list[dict[str, Any]]:
    async with Client(sock) as c:
        return [ev async for ev in c.stream("chat", text=text)]


def test_exec_result_then_speak_then_one_done(daemon_factory: Any) -> None:
    d = scripted(daemon_factory, code="print(6 * 7)", reply="forty-two")
    events = asyncio.run(chat_events(d.socket_path, "what is six times seven?"))
    kinds = [ev["event"] for ev in events]
    assert kinds.count("exec") == 1 and kinds.count("exec_result") == 1 and kinds[-1] == "done", kinds
    assert kinds.index("exec") < kinds.index("exec_result") < kinds.index("speak") < kinds.index("wait")
    ex = next(ev for ev in events if ev["event"] == "exec")
    res = next(ev for ev in events if ev["event"] == "exec_result")
    assert ex["code"] == "print(6 * 7)" and res["stdout"] == "42\n" and res["exit_code"] == 0
    assert res["exec_id"] == ex["exec_id"]
    assert "".join(ev["delta"] for ev in events if ev["event"] == "speak" and "delta" in ev) == "forty-two"
    assert events[-1]["result"]["speak"] == "forty-two" and events[-1]["result"]["reason"] == "wait"
    # The next turn plays the script again from its start: the state carried the cursor over.
    again = asyncio.run(chat_events(d.socket_path, "and again?"))
    assert [ev["event"] for ev in again].count("exec_result") == 1 and again[-1]["result"]["speak"] == "forty-two"
    st = d.request("status")
    assert st["turns"] == 2 and st["sandbox"]["runs"] == 2


def test_the_same_exec_repeated_is_broken_off(daemon_factory: Any) -> None:
    d = scripted(daemon_factory, agent={"max_repeat_exec": 2}, code="print(1)", reply="never said", execs=5)
    events = asyncio.run(chat_events(d.socket_path, "loop forever"))
    kinds = [ev["event"] for ev in events]
    assert kinds.count("exec_result") <= 2 and "speak" not in kinds, kinds
    assert events[-1]["event"] == "done" and events[-1]["result"]["reason"] == "guard"
    assert d.request("status")["state"] == "running"


def test_exec_limit_is_a_result_and_the_daemon_keeps_answering(daemon_factory: Any) -> None:
    d = scripted(daemon_factory, sandbox={"wall_s": 3.0, "cpu_s": 10.0}, code="while True: pass", reply="gave up")

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        turn = asyncio.create_task(chat_events(d.socket_path, "spin"))
        statuses = []
        async with Client(d.socket_path) as c:
            while not turn.done():
                statuses.append(await c.request("status", timeout=5))
                await asyncio.sleep(0.2)
        return await turn, statuses

    events, statuses = asyncio.run(go())
    res = next(ev for ev in events if ev["event"] == "exec_result")
    assert res["timed_out"] and res["limit"] == "wall"
    assert events[-1]["result"]["speak"] == "gave up", "the model reads the failure and carries on"
    assert len(statuses) >= 5 and all(s["state"] == "running" for s in statuses)
    assert any(s["phase"] == "exhale" for s in statuses), "status answered while the EXEC ran"
