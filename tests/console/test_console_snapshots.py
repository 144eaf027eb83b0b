"""Layout snapshots (pytest-textual-snapshot) at 80x24 and 200x50 against a real daemon.

The scripted backbone makes the turn deterministic (an EXEC that the disabled sandbox refuses, then
a Markdown reply), a long PAUSE holds the breath still after the turn, and the few values that
cannot repeat (pid, uptime, the temp socket path, the blinking cursor) are masked before the screenshot.
Update the pinned images with ``pytest tests/console --snapshot-update`` after a deliberate change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from console_helpers import scripted_daemon, wait_for
from textual.pilot import Pilot
from textual.widgets import Input

from agentd.console.app import ConsoleApp
from agentd.console.widgets import BreathIndicator
from tests.conftest import DaemonProc

REPLY = "The answer is **42**.\n\n- computed by `print(6 * 7)`\n- checked twice\n"


def _run_before(text: str) -> Callable[[Pilot[Any]], Any]:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, ConsoleApp)
        await wait_for(pilot, lambda: app.connected, what="the connection")
        await pilot.press(*text, "enter")
        await wait_for(pilot, lambda: app.chats_answered == 1, what="the turn's done")
        breath = app.query_one(BreathIndicator)
        await wait_for(pilot, lambda: breath.phase == "pause" and breath.breath == 2, what="the long PAUSE")
        st = await app.link.request("status")
        app.apply_status({**st, "pid": 4242, "uptime_s": 42.0})  # the volatile values, masked
        app.sub_title = "agentd.sock"
        app.query_one("#prompt", Input).cursor_blink = False  # else the shot catches the cursor on or off
        await pilot.pause(0.2)

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_layout_after_a_turn(daemon_factory: Callable[..., DaemonProc], snap_compare: Any,
                             size: tuple[int, int]) -> None:
    d = scripted_daemon(daemon_factory, REPLY, execs=1, code="import os\nprint(6 * 7)",
                        breath={"pause_s": 120.0})
    app = ConsoleApp(d.socket_path, status_interval_s=3600.0)  # no poll may change the screen
    assert snap_compare(app, terminal_size=size, run_before=_run_before("what is 6 x 7?"))
