"""The console driven with run_test() and Pilot against real daemon subprocesses.

The scripted backbone (tests/plugins) lets us choose what the model says, so these tests can check
what reaches the screen; the random hyena's turns are checked for their structure only.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

from console_helpers import screen_text, scripted_daemon, wait_for
from textual.widgets import DataTable, HelpPanel, Input

from agentd.console.app import ConsoleApp
from agentd.console.screens import ConditionScreen, MemorySearchScreen
from agentd.console.text import Backoff, printable
from agentd.console.widgets import (
    Banner,
    BreathIndicator,
    RemotePanel,
    SomaPanel,
    SpeakBlock,
    TurnView,
    UserMessage,
)
from tests.conftest import AGENTD, BASE_CONFIG, DaemonProc
from tests.models.test_remote import FakeServer  # the OpenAI-API stand-in of the remote backbone's tests

# Model output that tries markup, a click action, raw HTML, a link, terminal escapes (clear screen,
# set the window title, bell) and a bidi override.
HOSTILE = ("**bold** [red]markup[/red] [@click=app.quit]quit[/] <b>html</b> [site](http://example.invalid) "
           "esc\x1b[2J title\x1b]0;pwned\x07 bidi\u202eevil")


async def type_and_send(pilot: Any, text: str) -> None:
    await pilot.click("#prompt")
    await pilot.press(*text)
    await pilot.press("enter")


def test_a_message_streams_the_reply_and_its_done_with_hostile_text_shown_literally(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    d = scripted_daemon(daemon_factory, HOSTILE)

    async def go() -> None:
        app = ConsoleApp(d.socket_path, status_interval_s=0.5)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.connected, what="the connection")
            await type_and_send(pilot, "hello")
            await wait_for(pilot, lambda: app.chats_answered == 1, what="the chat's done")
            assert app.last_chat_result is not None and app.last_chat_result["reason"] == "wait"
            assert app.last_chat_result["speak"] == HOSTILE  # the daemon said exactly this
            note = app.query_one(UserMessage).note
            assert note == f"→ turn {app.last_chat_result['turn']} · wait"
            view = app.turns[app.last_chat_result["turn"]]
            await wait_for(pilot, lambda: view.reason == "wait", what="the turn's wait event")
            blocks = list(view.query(SpeakBlock))
            assert len(blocks) == 1 and blocks[0].ended
            assert blocks[0].deltas > 1, "SPEAK arrives as a stream of deltas, not one block"
            assert blocks[0].text == printable(HOSTILE)
            await pilot.pause(0.2)
            screen = screen_text(app)
            assert "[red]markup[/red]" in screen and "[@click=app.quit]quit[/]" in screen
            assert "<b>html</b>" in screen, "raw HTML stays text"
            assert "esc␛[2J" in screen and "title␛]0;pwned␇" in screen, "escapes are shown, never sent"
            assert "bidi<U+202E>evil" in screen
            assert "\x1b" not in screen and "\x07" not in screen
            assert "bold" in screen and "**bold**" not in screen, "Markdown is still Markdown"
            assert app.is_running  # nothing in the text ran an action
            # The breath indicator follows the daemon's phases live, and status reaches the panel.
            breath = app.query_one(BreathIndicator)
            await wait_for(pilot, lambda: breath.changes >= 3, what="several phase changes")
            assert breath.phase in ("inhale", "hold", "exhale", "pause")
            await wait_for(pilot, lambda: app.status.get("turns") == 1, what="a status poll after the turn")
            assert "turns 1" in screen_text(app)

    asyncio.run(go())


def test_exec_waits_for_approval_then_runs_or_is_denied(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = scripted_daemon(daemon_factory, "computed", execs=1, code="print(6 * 7)",
                        sandbox={"enabled": True, "approve": "ask", "approve_timeout_s": 30.0})

    async def go() -> None:
        app = ConsoleApp(d.socket_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.connected, what="the connection")
            assert not app.pending and "^y Approve" not in screen_text(app)
            await type_and_send(pilot, "what is six times seven?")
            await wait_for(pilot, lambda: len(app.pending) == 1, what="an EXEC pending approval")
            block = app.pending[0]
            assert block.code == "print(6 * 7)" and block.state == "pending approval"
            await pilot.pause(0.1)
            screen = screen_text(app)
            assert "print(6 * 7)" in screen and "approve (ctrl+y)" in screen, "the block has its buttons"
            assert "^y Approve" in screen and "^n Deny" in screen, "the footer offers the approval keys"
            palette = [c.title for c in app.get_system_commands(app.screen)]
            assert "Approve exec" in palette and "Deny exec" in palette, "and so does the command palette"
            await pilot.press("ctrl+y")
            await wait_for(pilot, lambda: app.chats_answered == 1, what="the first turn's done")
            await wait_for(pilot, lambda: block.result is not None, what="the EXEC's result")
            assert block.result is not None and block.result["stdout"] == "42\n" and block.state == "done"
            assert app.last_chat_result is not None and app.last_chat_result["speak"] == "computed"
            assert "42" in screen_text(app)

            # Second turn: deny with the block's own button.
            await type_and_send(pilot, "again, but I will say no")
            await wait_for(pilot, lambda: len(app.pending) == 1, what="the second EXEC")
            second = app.pending[0]
            assert second is not block
            await pilot.click(second.query_one(".deny"))
            await wait_for(pilot, lambda: app.chats_answered == 2, what="the second turn's done")
            await wait_for(pilot, lambda: second.result is not None, what="the denied EXEC's result")
            assert second.result is not None and second.result["limit"] == "denied" and second.state == "denied"
            assert not app.pending
            status = await asyncio.to_thread(d.request, "status")
            assert status["sandbox"]["runs"] == 1, "the denied code never ran"

    asyncio.run(go())


def test_cancel_interrupts_a_long_reply(daemon_factory: Callable[..., DaemonProc]) -> None:
    long_reply = "word " * 12000  # several seconds of tokens at the scripted model's pace
    d = scripted_daemon(daemon_factory, long_reply, max_tokens=65536)

    async def go() -> None:
        app = ConsoleApp(d.socket_path)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_for(pilot, lambda: app.connected, what="the connection")
            await type_and_send(pilot, "talk for a long time")
            await wait_for(pilot, lambda: any(b.deltas > 0 for b in app.query(SpeakBlock)), what="the reply starting")
            t0 = time.monotonic()
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.chats_answered == 1, timeout=20, what="the cancelled turn's done")
            assert time.monotonic() - t0 < 15
            result = app.last_chat_result
            assert result is not None and result["reason"] == "cancelled"
            assert 0 < len(result["speak"]) < len(long_reply)
            view = app.turns[result["turn"]]
            await wait_for(pilot, lambda: view.reason == "cancelled", what="the wait event")
            assert "— cancelled —" in screen_text(app)
            # Nothing runs now: cancel says so instead of failing.
            await pilot.press("escape")
            await wait_for(pilot, lambda: "no turn is running" in screen_text(app), what="the notification")

    asyncio.run(go())


def test_banner_while_the_daemon_is_away_and_reconnect_when_it_returns(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(start=False)  # the console opens first (as `agentd console --wait` does)

    async def go() -> None:
        app = ConsoleApp(d.socket_path, backoff=Backoff(first=0.1, cap=0.5))
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            banner = app.query_one(Banner)
            await wait_for(pilot, lambda: "not reachable" in screen_text(app), timeout=10, what="the banner")
            assert banner.shown and not app.connected
            await type_and_send(pilot, "anyone?")
            await pilot.pause(0.1)
            assert not app.query(UserMessage), "nothing is sent without a daemon"
            assert app.query_one("#prompt", Input).value == "anyone?", "the text waits in the input"

            await asyncio.to_thread(d.start)
            await wait_for(pilot, lambda: app.connected and not banner.shown, timeout=20, what="the first connection")
            await pilot.press("enter")  # the kept message goes now
            await wait_for(pilot, lambda: app.chats_answered == 1, what="a turn")
            first_turn = app.last_chat_result["turn"] if app.last_chat_result else None

            await asyncio.to_thread(d.stop)
            await wait_for(pilot, lambda: banner.shown, timeout=20, what="the banner after the stop")
            assert "agentd went away" in screen_text(app) and not app.connected

            await asyncio.to_thread(d.start)
            await wait_for(pilot, lambda: app.connected and not banner.shown, timeout=30, what="the reconnection")
            assert app.link.connects == 2
            await wait_for(pilot, lambda: "reconnected" in screen_text(app), timeout=5, what="the notification")
            await type_and_send(pilot, "back again")
            await wait_for(pilot, lambda: app.chats_answered == 2, what="a turn after reconnecting")
            assert app.last_chat_result is not None and first_turn is not None
            assert app.last_chat_result["turn"] > first_turn, "the restarted daemon resumed its turn count"
            assert all(isinstance(v, TurnView) and v.reason for v in app.turns.values())

    asyncio.run(go())


def test_conditions_and_memory_from_their_screens(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory({"memory": {"enabled": True}})
    hostile = "[bold]not bold[/bold] \x1b[31mred\x1b[0m [@click=app.quit]q[/]"
    stored = d.request("memory.add", text=hostile)["memory_id"]

    async def go() -> None:
        app = ConsoleApp(d.socket_path, status_interval_s=0.5)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.connected, what="the connection")
            # A condition: the dialog answers, and Soma's panel shows the reading from the event.
            await pilot.press("f4")
            await wait_for(pilot, lambda: isinstance(app.screen, ConditionScreen), what="the condition dialog")
            await pilot.press(*"temperature=71.5", "enter")
            await wait_for(pilot, lambda: "accepted 1 reading(s)" in screen_text(app), what="the condition's answer")
            await pilot.press("escape")
            soma = app.query_one(SomaPanel)
            await wait_for(pilot, lambda: soma.values.get("temperature") == 71.5, what="the reading in Soma's panel")
            assert "temperature = 71.5" in screen_text(app)

            # Add a memory from the console, then search: both memories show, the hostile one literally.
            await pilot.press("f3")
            await pilot.press(*"the console remembers tea", "enter")
            await wait_for(pilot, lambda: "stored as memory" in screen_text(app), what="memory.add's answer")
            await pilot.press("escape")
            await pilot.press("f2")
            await wait_for(pilot, lambda: isinstance(app.screen, MemorySearchScreen), what="the search dialog")
            await pilot.press(*"bold red", "enter")
            table = app.screen.query_one(DataTable)

            def texts() -> list[str]:
                return [str(table.get_row_at(i)[3]) for i in range(table.row_count)]

            # Soma also remembers a felt change as a memory, so there may be more than our two.
            await wait_for(pilot, lambda: "the console remembers tea" in texts(), what="the search results")
            assert printable(hostile) in texts()
            assert str(stored) in [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
            await pilot.pause(0.1)
            screen = screen_text(app)
            assert "[bold]not bold[/bold] ␛[31mred␛[0m [@click=app.quit]q[/]" in screen and "\x1b" not in screen
            await pilot.press("escape")
            count = (await asyncio.to_thread(d.request, "memory.stats"))["memories"]
            assert count >= 2
            await wait_for(pilot, lambda: f"{count} memories" in screen_text(app), what="the memory panel's count")

    asyncio.run(go())


def test_pause_view_clear_and_thoughts_toggle(shared_daemon: DaemonProc) -> None:

    async def go() -> None:
        app = ConsoleApp(shared_daemon.socket_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.connected, what="the connection")
            breath = app.query_one(BreathIndicator)
            await wait_for(pilot, lambda: breath.changes >= 2, what="phases moving")
            await pilot.press("f5")
            frozen_at = (breath.phase, breath.breath, breath.changes)
            await pilot.pause(1.2)  # more than two breaths of the test config
            assert (breath.phase, breath.breath, breath.changes) == frozen_at and "(view paused)" in screen_text(app)
            await pilot.press("f5")
            await wait_for(pilot, lambda: breath.changes > frozen_at[2], what="the view following again")

            await type_and_send(pilot, "say something")
            await wait_for(pilot, lambda: app.chats_answered == 1, what="the turn's done")
            view = app.turns[app.last_chat_result["turn"]]  # type: ignore[index]
            await wait_for(pilot, lambda: view.reason is not None, what="the wait event")
            thoughts = app.query_one("#thoughts")
            assert thoughts.display
            await pilot.press("ctrl+t")
            assert not thoughts.display
            await pilot.press("ctrl+t")
            assert thoughts.display
            await pilot.press("f6")
            await pilot.pause(0.1)
            assert not app.history and not app.query(UserMessage) and not app.query(TurnView)

            # Every action is in the command palette; F1 shows the keys.
            palette = [c.title for c in app.get_system_commands(app.screen)]
            for title in ("Search memory", "Add memory", "Send a condition", "Pause the breath view", "Clear",
                          "Cancel turn", "Toggle thoughts"):
                assert title in palette, title
            assert "Approve exec" not in palette, "approval only while an EXEC waits"
            await pilot.press("ctrl+p")
            await pilot.press(*"search memory")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, MemorySearchScreen), what="the palette's action")
            await pilot.press("escape")
            await pilot.press("f1")
            await wait_for(pilot, lambda: bool(app.screen.query(HelpPanel)), what="the help panel")
            assert "Approve" not in screen_text(app), "approval keys only while an EXEC waits"
            await pilot.press("f1")
            await wait_for(pilot, lambda: not app.screen.query(HelpPanel), what="the help panel to close")

    asyncio.run(go())


def test_no_daemon_is_a_one_line_error(tmp_path: Any) -> None:
    sock = tmp_path / "nobody.sock"
    r = subprocess.run([AGENTD, "console", "--socket", str(sock)], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(sock) in lines[0] and "not running" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""



def test_remote_panel_shows_the_endpoint_and_its_health_and_only_for_a_remote_backbone(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    server = FakeServer()  # answers GET /v1/models with 200: the daemon's health probe
    d = daemon_factory(backbone={**BASE_CONFIG["backbone"], "name": "remote", "options": {
        "base_url": server.url, "model": "tiny-chat", "api_key_env": "", "connect_timeout_s": 1.0,
        "health_interval_s": 0.2}})

    async def go() -> None:
        app = ConsoleApp(d.socket_path, status_interval_s=0.3)
        async with app.run_test(size=(120, 40)) as pilot:
            panel = app.query_one(RemotePanel)
            await wait_for(pilot, lambda: panel.health == "ok", what="the remote health probe's ok")
            await pilot.pause(0.1)
            screen = screen_text(app)
            assert panel.display and server.url in screen and "ok · tiny-chat · chat" in screen
            assert any(path.endswith("/models") for path, _, _ in server.requests)

            server.close()  # the server goes away: the next probe fails and the panel says so
            await wait_for(pilot, lambda: panel.health == "down", what="the health going down")
            await pilot.pause(0.1)
            screen = screen_text(app)
            assert "down · tiny-chat" in screen and app.status["remote"]["last_error"], screen
            assert panel.has_class("-down") and not panel.has_class("-ok")

    try:
        asyncio.run(go())
    finally:
        server.close()


def test_no_remote_panel_without_a_remote_backbone(shared_daemon: DaemonProc) -> None:

    async def go() -> None:
        app = ConsoleApp(shared_daemon.socket_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.connected and bool(app.status), what="the connection")
            await pilot.pause(0.1)
            assert "remote" not in app.status
            panel = app.query_one(RemotePanel)
            assert not panel.display and panel.health is None and "remote" not in screen_text(app)

    asyncio.run(go())
