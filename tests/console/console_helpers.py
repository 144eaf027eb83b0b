"""Helpers for driving the console against real daemons: a scripted-backbone daemon whose words
we choose (the tiny random hyena speaks gibberish, when it speaks at all), the screen as text, and
waiting for the app to reach a state."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

from tests.conftest import DaemonProc, to_toml

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")


def scripted_daemon(daemon_factory: Callable[..., DaemonProc], reply: str, *, execs: int = 0,
                    code: str = "print(6 * 7)", sandbox: dict[str, Any] | None = None,
                    breath: dict[str, Any] | None = None, max_tokens: int = 4096) -> DaemonProc:
    """A started daemon whose backbone (tests/plugins/agentd_scripted.py) runs ``execs`` EXECs of
    ``code``, then SPEAKs ``reply`` and WAITs, every turn. Both may hold newlines and control
    characters: they are written to the TOML as JSON strings (valid TOML basic strings, escapes and
    all), which the shared TOML writer does not do."""
    extra: dict[str, Any] = {"sandbox": {"enabled": False, **(sandbox or {})}}
    if breath:
        extra["breath"] = breath
    strings = {"reply": reply, "code": code}
    d = daemon_factory(extra, env={"PYTHONPATH": PLUGINS}, start=False, backbone={
        "name": "scripted", "max_tokens": max_tokens, "options": {**{k: f"@@{k}@@" for k in strings}, "execs": execs}})

    def write_config() -> None:
        cfg = {**d.config, "daemon": {**d.config["daemon"], "data_dir": str(d.root / "data"),
                                      "run_dir": str(d.root / "run")}}
        text = to_toml(cfg)
        for key, value in strings.items():
            assert f'"@@{key}@@"' in text
            text = text.replace(f'"@@{key}@@"', json.dumps(value, ensure_ascii=False))
        d.config_path.write_text(text)

    d.write_config = write_config  # type: ignore[method-assign]
    return d.start()


def screen_text(app: App[Any]) -> str:
    """The screen as plain text, as a terminal would show it (the same compositor output that
    App.export_screenshot renders to SVG)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), color_system=None, record=True,
                      legacy_windows=False)
    for strip in app.screen._compositor.render_strips():
        console.print("".join(seg.text for seg in strip), markup=False, highlight=False, soft_wrap=True)
    return console.export_text()


async def wait_for(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 30.0,
                   what: str = "the condition") -> None:
    """Let the app run until ``predicate()`` holds; fail naming ``what`` and showing the screen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; the screen:\n"
                                 f"{screen_text(pilot.app)}")
        await pilot.pause(0.05)
