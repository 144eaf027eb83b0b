"""Modal screens for the console's actions: search memory, add a memory, send a condition.

Each talks to the daemon through ``ConsoleApp.link.request`` (the app's one socket connection) and shows
its answer or the daemon's error in place; Escape closes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, Static

from agentd.console.link import ConsoleError
from agentd.console.text import printable

if TYPE_CHECKING:
    from agentd.console.app import ConsoleApp


class ActionScreen(ModalScreen[None]):
    """A small dialog: a title, one input, and a line for the answer."""

    BINDINGS = [Binding("escape", "dismiss_screen", "Close")]
    TITLE_TEXT = ""
    PLACEHOLDER = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Content.assemble((self.TITLE_TEXT, "bold")), classes="dialog-title")
            yield Input(placeholder=self.PLACEHOLDER, classes="dialog-input")
            yield from self.compose_body()
            yield Static(classes="dialog-answer")

    def compose_body(self) -> ComposeResult:
        yield from ()

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    def answer(self, text: str, error: bool = False) -> None:
        out = self.query_one(".dialog-answer", Static)
        out.update(Content(printable(text)))
        out.set_class(error, "-error")

    def action_dismiss_screen(self) -> None:
        self.dismiss(None)


class MemorySearchScreen(ActionScreen):
    """``memory.search``: the results in a table, best first."""

    TITLE_TEXT = "Search memory"
    PLACEHOLDER = "query, then Enter"

    def compose_body(self) -> ComposeResult:
        yield DataTable(cursor_type="row", zebra_stripes=True, classes="results")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "score", "kind", "text")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.search(event.value.strip())

    @work(exclusive=True, group="memory-search")
    async def search(self, query: str) -> None:
        self.answer("searching…")
        try:
            res = await self.console.link.request("memory.search", query=query, k=20)
        except ConsoleError as exc:
            self.answer(str(exc), error=True)
            return
        table = self.query_one(DataTable)
        table.clear()
        results: list[dict[str, Any]] = res.get("results") or []
        for r in results:
            # Text(...) and not str: DataTable would parse a str cell as markup.
            table.add_row(Text(str(r.get("memory_id", ""))), Text(f"{float(r.get('score', 0)):.3f}"),
                          Text(printable(str(r.get("kind", "")))), Text(printable(str(r.get("text", "")))))
        self.answer(f"{len(results)} result(s) for {query!r}")


class AddMemoryScreen(ActionScreen):
    """``memory.add``: store a note; the answer is its memory id once committed."""

    TITLE_TEXT = "Add a memory"
    PLACEHOLDER = "text to remember, then Enter"

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.add(event.value)

    @work(exclusive=True, group="memory-add")
    async def add(self, text: str) -> None:
        try:
            res = await self.console.link.request("memory.add", text=text, meta={"source": "console"})
        except ConsoleError as exc:
            self.answer(str(exc), error=True)
            return
        dup = res.get("duplicate")
        self.answer(f"stored as memory {res.get('memory_id')}" + (f" (already stored as {dup})" if dup else ""))
        self.query_one(Input).value = ""
        self.console.poll_status()


def parse_readings(text: str) -> dict[str, float]:
    """``"temperature=71.5 latency=12"`` as a dict; ValueError names the bad part."""
    out: dict[str, float] = {}
    for part in text.replace(",", " ").split():
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"{part!r} is not NAME=VALUE")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: {value!r} is not a number") from None
    if not out:
        raise ValueError("no readings: type NAME=VALUE, e.g. temperature=71.5")
    return out


class ConditionScreen(ActionScreen):
    """``condition``: feed readings to Soma, the same path MQTT readings take."""

    TITLE_TEXT = "Send a condition"
    PLACEHOLDER = "NAME=VALUE ..., e.g. temperature=71.5 latency=12"

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        try:
            values = parse_readings(event.value)
        except ValueError as exc:
            self.answer(str(exc), error=True)
            return
        self.send(values)

    @work(exclusive=True, group="condition")
    async def send(self, values: dict[str, float]) -> None:
        try:
            res = await self.console.link.request("condition", values=values)
        except ConsoleError as exc:
            self.answer(str(exc), error=True)
            return
        soma = res.get("soma") or {}
        self.answer(f"accepted {res.get('accepted')} reading(s); felt {soma.get('label')} "
                    f"(charge {float(soma.get('charge') or 0):.2f})")
