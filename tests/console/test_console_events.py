"""Events the test daemons cannot be made to send on cue (the scripted backbone never THINKs, and a
remote server's retries need a failing server mid-turn), handed to ``ConsoleApp.handle`` as the link
would hand them. No daemon runs: the link keeps retrying a socket nobody listens on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from console_helpers import screen_text, wait_for

from agentd.console.app import ConsoleApp
from agentd.console.text import Backoff
from agentd.console.widgets import RemotePanel, ThoughtBlock


def test_think_streams_into_the_thoughts_pane_dimmed_and_collapsible(tmp_path: Path) -> None:

    async def go() -> None:
        app = ConsoleApp(tmp_path / "none.sock", backoff=Backoff(first=5.0, cap=5.0))
        async with app.run_test(size=(100, 30)) as pilot:
            for delta in ("weighing ", "the [b]options[/b] ", "\x1b[2J carefully"):
                await app.handle({"event": "think", "turn": 7, "delta": delta})
            block = app.query_one(ThoughtBlock)
            await wait_for(pilot, lambda: "carefully" in screen_text(app), what="the streamed thought")
            screen = screen_text(app)
            assert "weighing the [b]options[/b] ␛[2J carefully" in screen and "turn 7" in screen
            assert block.body.has_class("thought-text") and app.query_one("#thoughts").styles.text_style.italic
            await app.handle({"event": "think", "turn": 7, "text": "the whole thought", "end": True})
            await wait_for(pilot, lambda: "the whole thought" in screen_text(app), what="the segment's full text")
            await pilot.click(block.query_one("CollapsibleTitle"))
            await wait_for(pilot, lambda: block.collapsed, what="the thought to collapse")
            assert "the whole thought" not in screen_text(app)
            await app.handle({"event": "wait", "turn": 7, "reason": "wait"})
            await pilot.press("ctrl+t")
            assert not app.query_one("#thoughts").display

    asyncio.run(go())


def test_remote_panel_says_retrying_with_the_last_error_and_notices_are_warnings(tmp_path: Path) -> None:

    async def go() -> None:
        app = ConsoleApp(tmp_path / "none.sock", backoff=Backoff(first=5.0, cap=5.0))
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            panel = app.query_one(RemotePanel)
            assert not panel.display
            remote = {"endpoint": "http://gpu-box:8000/v1", "model": "m", "api": "completions",
                      "health": "retrying", "last_error": "HTTP 503 \x1b[31mbusy", "consecutive_failures": 3,
                      "requests": 9, "retries": 4, "first_byte_s": 0.25}
            await app.handle({"event": "status", "phase": "hold", "breath": 3, "remote": remote})
            await pilot.pause(0.1)
            screen = screen_text(app)
            assert panel.display and panel.has_class("-retrying")
            for text in ("http://gpu-box:8000/v1", "retrying · m · completions", "requests 9 · retries 4",
                         "1st byte 0.25 s", "3× HTTP 503 ␛[31mbusy"):
                assert text in screen, text
            await app.handle({"event": "error", "code": "backbone_retry", "fatal": False,
                              "message": "attempt 2 failed; retrying in 1.0 s"})
            await wait_for(pilot, lambda: "agentd notice" in screen_text(app), what="the notice")
            assert [n.severity for n in app._notifications] == ["warning"]
            await app.handle({"event": "status", "phase": "pause", "breath": 3})
            await pilot.pause(0.1)
            assert not panel.display and "gpu-box" not in screen_text(app)

    asyncio.run(go())
