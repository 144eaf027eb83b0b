"""The console's widgets: the side panels (breath, Soma, memory, daemon) and the conversation.

Every text that came from the daemon is passed through ``printable`` and wrapped in ``Content``
(plain text, never parsed as markup) before a widget sees it; SPEAK goes to a ``Markdown`` widget
whose parser has raw HTML switched off and whose links are not opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.highlight import highlight
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Button, Collapsible, Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from agentd.console.text import printable

PHASES = ("inhale", "hold", "exhale", "pause")
SOMA_LABELS = ("calm", "alert", "urgent")


def plain(text: Any) -> Content:
    """Untrusted text as inert Content: escapes made visible, markup left as the characters it is."""
    return Content(printable(str(text)))


def bar(fraction: float, width: int = 10) -> str:
    """A text gauge, ``▰▰▰▱▱``, for a value in 0..1 (clamped)."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "▰" * filled + "▱" * (width - filled)


# -- side panels ---------------------------------------------------------------------------------


class Banner(Static):
    """The connection banner: hidden while connected, a clear line while the daemon is away."""

    def show(self, message: str) -> None:
        self.update(plain(message))
        self.add_class("-shown")

    def hide(self) -> None:
        self.update("")
        self.remove_class("-shown")

    @property
    def shown(self) -> bool:
        return self.has_class("-shown")


class BreathIndicator(Static):
    """The BreathClock's phase, live: a dot per phase with the current one lit, and the breath count.

    ``frozen`` (the "pause view" action) stops it following the daemon, for a calm screen or a
    screenshot; the daemon's clock itself is not touched."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.phase: str | None = None
        self.breath: int | None = None
        self.frozen = False
        self.changes = 0  # phase changes shown: lets tests and the curious see it is live

    def on_mount(self) -> None:
        self.border_title = "breath"
        self._render_now()

    def set_phase(self, phase: str, breath: int | None) -> None:
        if self.frozen or phase not in PHASES:
            return
        if phase != self.phase:
            self.changes += 1
        self.phase, self.breath = phase, breath
        for p in PHASES:
            self.set_class(p == phase, f"-{p}")
        self._render_now()

    def toggle_frozen(self) -> bool:
        self.frozen = not self.frozen
        self._render_now()
        return self.frozen

    def _render_now(self) -> None:
        if self.phase is None:
            self.update(Content("waiting for the daemon…"))
            return
        dots = Content.assemble(*[("● " if p == self.phase else "○ ", "bold" if p == self.phase else "dim")
                                  for p in PHASES])
        line = Content.assemble((self.phase.upper(), "bold"), f"  #{self.breath if self.breath is not None else '?'}")
        if self.frozen:
            line = line + Content.assemble(("  (view paused)", "italic"))
        self.update(Content("\n").join([line, dots]))


class SomaPanel(Static):
    """Soma's felt state (calm / alert / urgent, a charge 0..1) and the readings behind it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label: str | None = None
        self.values: dict[str, float] = {}

    def on_mount(self) -> None:
        self.border_title = "soma"
        self.update(Content("—"))

    def show(self, soma: dict[str, Any], values: dict[str, Any] | None = None) -> None:
        label = str(soma.get("label", "?"))
        charge = float(soma.get("charge") or 0.0)
        charges = soma.get("charges") or {}
        self.label = label
        self.values = {str(k): v for k, v in (values if values is not None else soma.get("values") or {}).items()}
        for name in SOMA_LABELS:
            self.set_class(name == label, f"-{name}")
        lines = [Content.assemble((printable(label), "bold"), f"  {bar(charge, 8)} {charge:.2f}")]
        for name, value in sorted(self.values.items()):
            c = charges.get(name)
            extra = f"  ({float(c):.2f})" if isinstance(c, int | float) else ""
            lines.append(Content(printable(f"{name} = {_num(value)}{extra}")))
        if not self.values:
            lines.append(Content.assemble(("no readings", "dim")))
        self.update(Content("\n").join(lines))


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, int | float) else printable(str(v))


class MemoryStats(Static):
    """Long-term memory at a glance, from the ``memory`` section of ``status``."""

    def on_mount(self) -> None:
        self.border_title = "memory"
        self.update(Content("—"))

    def show(self, mem: dict[str, Any]) -> None:
        if not mem.get("enabled", True):
            self.update(Content.assemble(("off", "dim")))
            return
        if "error" in mem:
            self.update(plain(f"error: {mem['error']}"))
            return
        lines = [f"{mem.get('memories', '?')} memories · {mem.get('index', '?')}",
                 f"remembered {mem.get('remembered', 0)} · recalls {mem.get('recalls', 0)}"]
        snap = mem.get("snapshot") or {}
        if snap.get("seq") is not None:
            lines.append(f"snapshot #{snap['seq']}")
        self.update(plain("\n".join(lines)))


class DaemonInfo(Static):
    """Who we talk to: backbone, turns, position, pid, uptime. Volatile by nature (uptime, pid)."""

    def on_mount(self) -> None:
        self.border_title = "daemon"
        self.update(Content("—"))

    def show(self, st: dict[str, Any]) -> None:
        up = float(st.get("uptime_s") or 0)
        uptime = f"{up / 3600:.1f} h" if up >= 3600 else f"{up / 60:.0f} min" if up >= 60 else f"{up:.0f} s"
        lines = [f"{st.get('backbone', '?')} · {st.get('state', '?')}",
                 f"turns {st.get('turns', '?')} · pos {st.get('position', '?')}",
                 f"pid {st.get('pid', '?')} · up {uptime}"]
        mqtt = st.get("mqtt")
        if isinstance(mqtt, dict) and mqtt.get("enabled", True) and mqtt.get("link") not in (None, "off"):
            lines.append(f"mqtt {mqtt.get('link')}")
        self.update(plain("\n".join(lines)))


class RemotePanel(Static):
    """The remote backbone's endpoint and health, from the ``remote`` section of ``status``.

    Only a daemon whose backbone is ``remote`` has that section; for any other the panel stays
    hidden, so a local model's console carries no empty box."""

    HEALTH = ("unknown", "ok", "retrying", "down")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.health: str | None = None

    def on_mount(self) -> None:
        self.border_title = "remote"
        self.display = False

    def show(self, remote: dict[str, Any] | None) -> None:
        if not isinstance(remote, dict):
            self.health = None
            self.display = False
            return
        self.health = str(remote.get("health") or "unknown")
        for name in self.HEALTH:
            self.set_class(name == self.health, f"-{name}")
        # The endpoint is the server's base URL (the daemon strips credentials); it is still text
        # from outside, so it goes through printable like everything else.
        lines = [Content(printable(str(remote.get("endpoint") or "?"))),
                 Content.assemble((printable(self.health), "bold"),
                                  printable(f" · {remote.get('model') or '?'} · {remote.get('api') or '?'}"))]
        facts = [f"requests {remote.get('requests', 0)}", f"retries {remote.get('retries', 0)}"]
        first_byte = remote.get("first_byte_s")
        if isinstance(first_byte, int | float):
            facts.append(f"1st byte {first_byte:.2f} s")
        lines.append(Content(" · ".join(facts)))
        if remote.get("last_error") and self.health != "ok":
            failures = remote.get("consecutive_failures")
            lead = f"{failures}× " if isinstance(failures, int) and failures > 1 else ""
            lines.append(Content.assemble((printable(f"{lead}{remote['last_error']}"), "italic")))
        self.update(Content("\n").join(lines))
        self.display = True


# -- conversation --------------------------------------------------------------------------------


def _markdown_parser() -> MarkdownIt:
    # The model's SPEAK is Markdown, but raw HTML stays text: nothing it writes becomes structure
    # beyond what Markdown itself allows.
    return MarkdownIt("gfm-like", {"html": False})


class UserMessage(Static):
    """What the user typed, and once the daemon answers, which turn answered it."""

    def __init__(self, text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text = text
        self.note = "sending…"

    def on_mount(self) -> None:
        self._show()

    def set_note(self, note: str) -> None:
        self.note = note
        self._show()

    def _show(self) -> None:
        self.update(Content.assemble(("you › ", "bold"), printable(self.text), (f"   {self.note}", "dim italic")))


class SpeakBlock(Markdown):
    """One SPEAK segment, streamed into Markdown as it arrives (``Markdown.get_stream`` batches
    appends so a fast model does not outrun the renderer)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(parser_factory=_markdown_parser, open_links=False, **kwargs)
        self.text = ""
        self.stream: MarkdownStream | None = None
        self.ended = False
        self.deltas = 0

    async def write(self, delta: str) -> None:
        if self.stream is None:
            self.stream = Markdown.get_stream(self)
        safe = printable(delta)
        self.text += safe
        self.deltas += 1
        await self.stream.write(safe)

    async def end(self, full: str | None = None) -> None:
        """Close the stream; ``full`` (the segment's whole text, sent at its end) repairs any
        deltas a slow console lost to the daemon's bounded queue."""
        if self.ended:
            return
        self.ended = True
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        if full is not None and printable(full) != self.text:
            self.text = printable(full)
            await self.update(self.text)


class ExecBlock(Vertical):
    """An EXEC: the code, highlighted; approve / deny buttons while it waits; then its result."""

    @dataclass
    class Decision(Message):
        """The user approved or denied a pending EXEC."""

        block: ExecBlock
        approve: bool

    def __init__(self, code: str, exec_id: str | None, pending: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.code = code
        self.exec_id = exec_id
        self.pending = pending
        self.state = "pending approval" if pending else "running"
        self.result: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._title(), classes="exec-title")
        yield Static(highlight(printable(self.code), language="python"), classes="exec-code")
        with Horizontal(classes="exec-actions"):
            yield Button("approve (ctrl+y)", variant="success", classes="approve", compact=True)
            yield Button("deny (ctrl+n)", variant="error", classes="deny", compact=True)
        result = Static(classes="exec-result")
        result.display = False  # until there is a result: an empty Static still takes a line
        yield result

    def on_mount(self) -> None:
        self.set_class(self.pending, "-pending")

    def _title(self) -> Content:
        return Content.assemble(("exec", "bold"), f" · {self.state}")

    def set_state(self, state: str, pending: bool = False) -> None:
        self.state = state
        self.pending = pending
        self.set_class(pending, "-pending")
        if self.is_mounted:
            self.query_one(".exec-title", Label).update(self._title())

    def show_result(self, ev: dict[str, Any]) -> None:
        self.result = ev
        code = ev.get("exit_code")
        flags = [f"exit {code}" if code is not None else "not run"]
        if ev.get("timed_out"):
            flags.append("timed out")
        if ev.get("limit"):
            flags.append(f"limit {ev['limit']}")
        if ev.get("cpu_s"):
            flags.append(f"{float(ev['cpu_s']):.2f} s cpu")
        ok = code == 0 and not ev.get("timed_out")
        refused = ev.get("limit") in ("denied", "disabled", "unavailable")  # the code never ran
        self.set_state("done" if ok else str(ev["limit"]) if refused else "failed")
        self.set_class(not ok, "-failed")
        parts = [Content.assemble(("result · " + " · ".join(flags), "bold"))]
        out = str(ev.get("stdout") or "").rstrip("\n")
        err = str(ev.get("stderr") or "").rstrip("\n")
        if out:
            parts.append(plain(out))
        if err:
            parts.append(Content.assemble((printable(err), "italic")))
        if ev.get("truncated"):
            parts.append(Content.assemble(("(output truncated)", "dim")))
        out = self.query_one(".exec-result", Static)
        out.update(Content("\n").join(parts))
        out.display = True

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if self.pending:
            self.post_message(self.Decision(self, event.button.has_class("approve")))


class TurnView(Vertical):
    """One turn of the agent, in order: its SPEAK segments and EXEC blocks, then how it ended."""

    def __init__(self, turn: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turn = turn
        self.speak: SpeakBlock | None = None  # the segment being streamed
        self.execs: list[ExecBlock] = []
        self.reason: str | None = None  # how it ended (the wait event's reason); None while it runs
        self.thought: ThoughtBlock | None = None  # its THINK text, in the thoughts pane

    def compose(self) -> ComposeResult:
        yield Label(Content.assemble((f"turn {self.turn}", "bold")), classes="turn-title")

    async def speak_delta(self, delta: str) -> None:
        if self.speak is None:
            self.speak = SpeakBlock(classes="speak")
            await self.mount(self.speak)
        await self.speak.write(delta)

    async def speak_end(self, text: str | None) -> None:
        if self.speak is None:  # a segment whose deltas were all lost: show it whole
            self.speak = SpeakBlock(classes="speak")
            await self.mount(self.speak)
        await self.speak.end(text)
        self.speak = None

    def find_exec(self, exec_id: str | None) -> ExecBlock | None:
        for block in reversed(self.execs):
            if block.exec_id == exec_id and (exec_id is not None or block.result is None):
                return block
        return None

    async def exec_event(self, ev: dict[str, Any]) -> ExecBlock:
        await self._close_speak()
        exec_id = ev.get("exec_id")
        pending = ev.get("approval") == "pending"
        block = self.find_exec(exec_id) if exec_id is not None else None
        if block is None:
            block = ExecBlock(str(ev.get("code", "")), exec_id, pending, classes="exec")
            self.execs.append(block)
            await self.mount(block)
        else:
            block.set_state("pending approval" if pending else "running", pending)
        return block

    async def finish(self, reason: str) -> None:
        await self._close_speak()
        self.reason = reason
        for block in self.execs:
            if block.pending:
                block.set_state("not approved (turn ended)")
        self.add_class("-done")
        await self.mount(Label(Content.assemble((f"— {printable(reason)} —", "dim")), classes="turn-end"))

    async def _close_speak(self) -> None:
        if self.speak is not None:
            await self.speak.end()
            self.speak = None


class ThoughtBlock(Collapsible):
    """One turn's THINK text, dimmed, collapsible. Deltas are batched: re-rendering the whole
    thought on each of thousands of tokens would cost quadratic time."""

    def __init__(self, turn: int, **kwargs: Any) -> None:
        self.body = Static(classes="thought-text")
        super().__init__(self.body, title=f"turn {turn}", collapsed=False, **kwargs)
        self.turn = turn
        self.text = ""
        self._timer: Timer | None = None

    def add(self, delta: str) -> None:
        self.text += printable(delta)
        if self._timer is None:
            self._timer = self.set_timer(0.05, self._flush)

    def replace(self, text: str) -> None:
        self.text = printable(text)
        self._flush()

    def _flush(self) -> None:
        self._timer = None
        self.body.update(Content(self.text))


class FollowingScroll(VerticalScroll):
    """A scroll that follows the newest text (until the user scrolls up) once there is more than fits.

    Textual's anchor also bottom-aligns content shorter than the view, which leaves a fresh console's
    first lines at the foot of an empty pane; so it is anchored only while the content overflows.
    A light timer checks that: Textual sends no event when only the content's height changes."""

    def on_mount(self) -> None:
        self.set_interval(0.2, self._follow)

    def _follow(self) -> None:
        overflowing = self.virtual_size.height > self.scrollable_content_region.height
        if overflowing and not self.is_anchored:
            self.anchor()
        elif not overflowing and self.is_anchored:
            self.anchor(False)


class Conversation(FollowingScroll):
    """What was said, turn by turn; follows the newest text unless the user scrolls up."""


class Thoughts(FollowingScroll):
    """THINK segments, per turn."""

    def on_mount(self) -> None:
        super().on_mount()
        self.border_title = "thoughts"
