"""``ConsoleApp``: the Textual console for a running agentd.

Layout (console.tcss)::

    Header
    Banner                              (only while the daemon is away)
    ┌ Conversation ───────────────┐ ┌ side ─────┐
    │ you › …                     │ │ breath    │
    │ turn N: SPEAK (Markdown),   │ │ soma      │
    │         EXEC blocks, end    │ │ memory    │
    ├ Thoughts (ctrl+t) ──────────┤ │ daemon    │
    │ turn N: THINK, dimmed       │ │ remote    │  (only with the remote backbone)
    └─────────────────────────────┘ └───────────┘
    Input (Enter sends)
    Footer (key bindings; F1 lists them all, ctrl+p has every action)

The socket is read by one exclusive worker (``run_link``) that iterates ``Link.run()`` and hands
each event to ``handle``; requests (chat, cancel, approvals, memory, conditions) run in their own
workers over the same connection. The console is a client of the protocol only.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, HelpPanel, Input, Markdown

from agentd.console.link import Connected, ConsoleError, Disconnected, Link
from agentd.console.screens import AddMemoryScreen, ConditionScreen, MemorySearchScreen
from agentd.console.text import Backoff, printable
from agentd.console.widgets import (
    Banner,
    BreathIndicator,
    Conversation,
    DaemonInfo,
    ExecBlock,
    MemoryStats,
    RemotePanel,
    SomaPanel,
    ThoughtBlock,
    Thoughts,
    TurnView,
    UserMessage,
)

Event = dict[str, Any]

# A console left open for months must not grow without bound: older turns leave the screen.
MAX_TURNS_SHOWN = 200


class ConsoleApp(App[None]):
    CSS_PATH = "console.tcss"
    TITLE = "agentd console"

    # The footer has room for the common keys at 80 columns; F1 lists them all, ctrl+p has every action.
    # (ctrl+x, ctrl+a... belong to the input line, so the console's keys avoid them.)
    BINDINGS = [
        Binding("escape", "cancel_turn", "Cancel", tooltip="Interrupt the turn being generated"),
        Binding("ctrl+y", "approve", "Approve", tooltip="Run the oldest EXEC waiting for approval"),
        Binding("ctrl+n", "deny", "Deny", tooltip="Refuse the oldest EXEC waiting for approval"),
        Binding("f1", "help", "Help", tooltip="Show or hide the key bindings"),
        Binding("f2", "search_memory", "Search", tooltip="Search long-term memory"),
        Binding("f3", "add_memory", "Remember", tooltip="Add a memory", show=False),
        Binding("f4", "send_condition", "Condition", tooltip="Send sensor readings to Soma"),
        Binding("f5", "pause_view", "Pause view", tooltip="Freeze or resume the breath indicator", show=False),
        Binding("f6", "clear", "Clear", tooltip="Clear finished turns from the screen", show=False),
        Binding("ctrl+t", "toggle_thoughts", "Thoughts", tooltip="Show or hide the thoughts pane", show=False),
        Binding("ctrl+q", "quit", "Quit", tooltip="Leave the console (the daemon keeps running)"),
    ]

    def __init__(self, socket_path: str | os.PathLike[str], *, status_interval_s: float = 5.0,
                 backoff: Backoff | None = None) -> None:
        super().__init__()
        self.link = Link(socket_path, backoff=backoff)
        self.status_interval_s = status_interval_s
        self.sub_title = str(socket_path)
        self.turns: dict[int, TurnView] = {}  # by turn number, for this connection's events
        self.history: list[TurnView] = []  # every turn on screen, oldest first
        self.pending: list[ExecBlock] = []  # EXECs waiting for exec.approve, oldest first
        self.status: dict[str, Any] = {}
        self.chats_answered = 0
        self.last_chat_result: dict[str, Any] | None = None
        self._handlers: dict[str, Callable[[Event], Awaitable[None]]] = {
            "phase": self._on_phase, "think": self._on_think, "speak": self._on_speak, "exec": self._on_exec,
            "exec_result": self._on_exec_result, "wait": self._on_wait, "condition": self._on_condition,
            "status": self._on_status, "error": self._on_error,
        }

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Banner(id="banner")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Conversation(id="conversation")
                yield Thoughts(id="thoughts")
            with VerticalScroll(id="side"):
                yield BreathIndicator(id="breath", classes="panel")
                yield SomaPanel(id="soma", classes="panel")
                yield MemoryStats(id="memory", classes="panel")
                yield DaemonInfo(id="daemon-info", classes="panel")
                yield RemotePanel(id="remote", classes="panel")
        yield Input(placeholder="Message agentd (Enter sends)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Banner).show(f"connecting to agentd at {self.link.socket_path}…")
        self.query_one("#prompt", Input).focus()
        self.run_link()
        self.set_interval(self.status_interval_s, self.poll_status)

    @property
    def connected(self) -> bool:
        return self.link.connected

    # -- the socket -----------------------------------------------------------------------------
    @work(exclusive=True, group="link", name="agentd link")
    async def run_link(self) -> None:
        async with contextlib.aclosing(self.link.run()) as events:
            async for ev in events:
                try:
                    await self.handle(ev)
                except NoMatches:
                    # On quit, Textual takes the screens apart before it cancels workers: an event
                    # arriving in between finds no widgets. Only then is that not a bug.
                    if self.is_running:
                        raise
                    return

    async def handle(self, ev: Event | Connected | Disconnected) -> None:
        """Show one thing the link reported."""
        if isinstance(ev, Connected):
            self._on_connected(ev.status)
            return
        if isinstance(ev, Disconnected):
            await self._on_disconnected(ev)
            return
        handler = self._handlers.get(str(ev.get("event")))
        if handler is None:
            return  # an event kind newer than this console: nothing to show for it
        try:
            await handler(ev)
        except (KeyError, TypeError, ValueError) as exc:
            # A malformed event (another daemon version?) is reported, and the console carries on.
            self.notify(printable(f"could not show a {ev.get('event')} event: {exc!r}"), severity="warning",
                        markup=False)

    def _on_connected(self, status: dict[str, Any]) -> None:
        # A restarted daemon may number turns again from an older snapshot: old views keep their
        # place on screen but no longer receive events.
        self.turns.clear()
        self.query_one(Banner).hide()
        self.apply_status(status)
        if self.link.connects > 1:
            self.notify("reconnected to agentd", title="agentd")
        self.refresh_bindings()

    async def _on_disconnected(self, ev: Disconnected) -> None:
        lead = "agentd went away" if ev.was_connected else "agentd is not reachable"
        # The socket path is in the header; the reason says what failed.
        self.query_one(Banner).show(f"⚠ {lead}: {ev.reason}. Retrying in {ev.retry_in_s:.1f} s (attempt {ev.attempt}).")
        for view in self.history:
            if view.reason is None:
                await view.finish("connection lost")
        self.pending.clear()
        self.refresh_bindings()

    @work(exclusive=True, group="poll")
    async def poll_status(self) -> None:
        """Refresh the side panels (status has turns, memory and Soma sections; phases also stream)."""
        if not self.link.connected:
            return
        with contextlib.suppress(ConsoleError):  # a lost link is reported by run_link, not here
            self.apply_status(await self.link.request("status", timeout=10.0))

    def apply_status(self, st: dict[str, Any]) -> None:
        """Show a ``status`` result in the side panels."""
        self.status = st
        if st.get("phase"):
            self.query_one(BreathIndicator).set_phase(str(st["phase"]), st.get("breath"))
        if isinstance(st.get("soma"), dict):
            self.query_one(SomaPanel).show(st["soma"])
        if isinstance(st.get("memory"), dict):
            self.query_one(MemoryStats).show(st["memory"])
        self.query_one(DaemonInfo).show(st)
        self.query_one(RemotePanel).show(st.get("remote"))

    # -- events ---------------------------------------------------------------------------------
    async def _turn(self, ev: Event) -> TurnView:
        n = int(ev.get("turn") or 0)
        view = self.turns.get(n)
        if view is None or view.reason is not None:  # a finished turn gets no more events: a new one
            view = TurnView(n, classes="turn")
            self.turns[n] = view
            self.history.append(view)
            await self.query_one(Conversation).mount(view)
            await self._trim()
        return view

    async def _trim(self) -> None:
        while len(self.history) > MAX_TURNS_SHOWN and self.history[0].reason is not None:
            await self._forget(self.history[0], with_messages=True)

    async def _forget(self, view: TurnView, with_messages: bool) -> None:
        """Take a finished turn off the screen (and, when trimming, the user messages before it)."""
        if with_messages:
            for child in list(self.query_one(Conversation).children):
                if child is view:
                    break
                if isinstance(child, UserMessage):
                    await child.remove()
        self.history.remove(view)
        if self.turns.get(view.turn) is view:
            del self.turns[view.turn]
        if view.thought is not None:
            await view.thought.remove()
        await view.remove()

    async def _on_phase(self, ev: Event) -> None:
        self.query_one(BreathIndicator).set_phase(str(ev["phase"]), ev.get("breath"))

    async def _on_think(self, ev: Event) -> None:
        view = await self._turn(ev)
        block = view.thought
        if block is None:
            block = view.thought = ThoughtBlock(view.turn, classes="thought")
            await self.query_one(Thoughts).mount(block)
        if "delta" in ev:
            block.add(str(ev["delta"]))
        elif ev.get("end") and "text" in ev:
            block.replace(str(ev["text"]))

    async def _on_speak(self, ev: Event) -> None:
        view = await self._turn(ev)
        if "delta" in ev:
            await view.speak_delta(str(ev["delta"]))
        elif ev.get("end"):
            await view.speak_end(str(ev["text"]) if "text" in ev else None)

    async def _on_exec(self, ev: Event) -> None:
        view = await self._turn(ev)
        block = await view.exec_event(ev)
        if block.pending and block not in self.pending:
            self.pending.append(block)
            self.notify("an EXEC waits for approval: ctrl+y approves, ctrl+n denies", title="exec",
                        severity="warning")
        elif not block.pending and block in self.pending:
            self.pending.remove(block)
        self.refresh_bindings()

    async def _on_exec_result(self, ev: Event) -> None:
        view = await self._turn(ev)
        block = view.find_exec(ev.get("exec_id"))
        if block is None:  # its exec event was lost (dropped, or sent before we connected)
            block = await view.exec_event({"exec_id": ev.get("exec_id"), "code": "(code not seen)"})
        block.show_result(ev)
        if block in self.pending:
            self.pending.remove(block)
            self.refresh_bindings()

    async def _on_wait(self, ev: Event) -> None:
        view = await self._turn(ev)
        await view.finish(str(ev.get("reason", "?")))
        self.pending = [b for b in self.pending if b not in view.execs]
        self.refresh_bindings()

    async def _on_condition(self, ev: Event) -> None:
        self.query_one(SomaPanel).show(ev["soma"], ev.get("values"))

    async def _on_status(self, ev: Event) -> None:
        self.apply_status({k: v for k, v in ev.items() if k not in ("event", "id")})

    async def _on_error(self, ev: Event) -> None:
        # "fatal": false marks a notice (a remote backbone's retry, malformed chunks) while the turn
        # goes on: a warning, not an error, so a retrying server does not look like a failed turn.
        notice = ev.get("fatal") is False
        self.notify(printable(f"{ev.get('code')}: {ev.get('message')}"), markup=False,
                    title="agentd notice" if notice else "agentd error", severity="warning" if notice else "error")

    # -- chat -----------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    async def _submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip():
            return
        if not self.link.connected:
            self.notify("not connected to agentd: the message was not sent (it stays in the input)",
                        severity="warning")
            return
        event.input.value = ""
        msg = UserMessage(text, classes="user")
        await self.query_one(Conversation).mount(msg)
        self.send_chat(msg)

    @work(group="chat")
    async def send_chat(self, msg: UserMessage) -> None:
        try:
            # No timeout: a turn lasts as long as the model speaks; a lost link ends the wait.
            res = await self.link.request("chat", timeout=math.inf, text=msg.text)
        except ConsoleError as exc:
            msg.set_note(f"not answered: {exc}")
            return
        msg.set_note(f"→ turn {res.get('turn')} · {res.get('reason')}")
        self.chats_answered += 1
        self.last_chat_result = res

    def on_markdown_link_clicked(self, event: Markdown.LinkClicked) -> None:
        # Links come from the model: show where they point, never open them.
        self.notify(printable(f"link (not opened): {event.href}"), markup=False)

    # -- actions --------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("approve", "deny"):
            return bool(self.pending)  # shown in the footer only while an EXEC waits
        return True

    @work(group="cancel")
    async def action_cancel_turn(self) -> None:
        try:
            res = await self.link.request("cancel")
        except ConsoleError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.notify("cancelled the turn" if res.get("cancelled") else "no turn is running")

    def action_approve(self) -> None:
        if self.pending:
            self.decide(self.pending[0], True)

    def action_deny(self) -> None:
        if self.pending:
            self.decide(self.pending[0], False)

    def on_exec_block_decision(self, message: ExecBlock.Decision) -> None:
        self.decide(message.block, message.approve)

    @work(group="approve")
    async def decide(self, block: ExecBlock, approve: bool) -> None:
        if block in self.pending:
            self.pending.remove(block)
        block.set_state("approving…" if approve else "denying…")
        self.refresh_bindings()
        try:
            res = await self.link.request("exec.approve", exec_id=block.exec_id, approve=approve)
        except ConsoleError as exc:
            block.set_state(f"approval failed: {exc}")
            self.notify(str(exc), severity="error", markup=False)
            return
        if block.result is None:  # the result may already be here
            block.set_state("approved, running" if res.get("approved") else "denied")

    def action_toggle_thoughts(self) -> None:
        self.query_one(Thoughts).toggle_class("-hidden")

    def action_help(self) -> None:
        if self.screen.query(HelpPanel):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_search_memory(self) -> None:
        self.push_screen(MemorySearchScreen())

    def action_add_memory(self) -> None:
        self.push_screen(AddMemoryScreen())

    def action_send_condition(self) -> None:
        self.push_screen(ConditionScreen())

    def action_pause_view(self) -> None:
        frozen = self.query_one(BreathIndicator).toggle_frozen()
        self.notify("breath view paused (F5 resumes)" if frozen else "breath view follows the daemon again")

    async def action_clear(self) -> None:
        """Clear finished turns and answered messages from the screen (the daemon keeps everything)."""
        for view in [v for v in self.history if v.reason is not None]:
            await self._forget(view, with_messages=False)
        for msg in self.query(UserMessage):
            if msg.note != "sending…":
                await msg.remove()

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Search memory", "Search long-term memory (memory.search) (F2)", self.action_search_memory)
        yield SystemCommand("Add memory", "Store a note in long-term memory (memory.add) (F3)", self.action_add_memory)
        yield SystemCommand("Send a condition", "Feed readings to Soma (condition) (F4)", self.action_send_condition)
        yield SystemCommand("Pause the breath view", "Freeze or resume the breath indicator (F5)",
                            self.action_pause_view)
        yield SystemCommand("Clear", "Clear finished turns from the screen (F6)", self.action_clear)
        yield SystemCommand("Cancel turn", "Interrupt the turn being generated (Esc)", self.action_cancel_turn)
        yield SystemCommand("Toggle thoughts", "Show or hide the thoughts pane (ctrl+t)", self.action_toggle_thoughts)
        if self.pending:
            yield SystemCommand("Approve exec", "Run the oldest EXEC waiting for approval (ctrl+y)",
                                self.action_approve)
            yield SystemCommand("Deny exec", "Refuse the oldest EXEC waiting for approval (ctrl+n)", self.action_deny)
