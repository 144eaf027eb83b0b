"""Shared fixtures: a real ``agentd start`` subprocess on a temp socket (``daemon_factory``).

Each daemon gets its own config file (a tiny random backbone, a quick breath, temp data and run
dirs); tests pass extra sections to override any key. Teardown stops every daemon still running.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket as socketlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agentd.client import Client

AGENTD = str(Path(sys.executable).parent / "agentd")

BASE_CONFIG: dict[str, dict[str, Any]] = {
    "daemon": {"log_level": "info", "log_format": "json", "torch_threads": 1, "shutdown_timeout_s": 10.0},
    "breath": {"inhale_s": 0.02, "hold_s": 0.02, "exhale_s": 0.0, "pause_s": 0.5},
    "backbone": {"name": "hyena", "max_tokens": 24, "options": {"d_model": 32, "n_layers": 2, "filter_len": 16, "window": 16}},
    "memory": {"enabled": False},
    "sandbox": {"enabled": False},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(doc: dict[str, dict[str, Any]]) -> str:
    """A small TOML writer for config tables (tables nested one level, as config.toml has)."""
    lines: list[str] = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for name, sub in subtables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class DaemonProc:
    """A real daemon subprocess and the paths it uses."""

    root: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "agentd.toml"

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "agentd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def write_config(self) -> None:
        cfg = merge(self.config, {"daemon": {"data_dir": str(self.root / "data"), "run_dir": str(self.root / "run")}})
        self.config_path.write_text(to_toml(cfg))

    def start(self, wait: bool = True, timeout: float = 120.0) -> DaemonProc:
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if "NOTIFY_SOCKET" not in self.env:  # a test's own systemd stand-in only
            env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([AGENTD, "--config", str(self.config_path), "start"], stdout=logf,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agentd exited with {self.proc.returncode} during start-up:\n{self.log()}")
            if self.socket_path.exists():
                try:
                    self.request("status", timeout=10)
                    return
                except Exception:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"agentd did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            async with Client(self.socket_path) as c:
                return await c.request(op, timeout=timeout, **fields)

        return asyncio.run(go())

    def chat(self, text: str) -> list[dict[str, Any]]:
        """Every event of one chat request, its terminal event last."""
        async def go() -> list[dict[str, Any]]:
            async with Client(self.socket_path) as c:
                return [ev async for ev in c.stream("chat", text=text)]

        return asyncio.run(go())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cli(self, *args: str, timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AGENTD, "--config", str(self.config_path), *args], capture_output=True, text=True,
                              timeout=timeout, input=input)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """``daemon_factory(extra_config, env=..., start=True, backbone=...)`` -> a started DaemonProc.

    ``extra_config`` is merged into BASE_CONFIG; ``backbone``, when given, replaces its [backbone]
    section whole, so none of the base's hyena options reach another architecture."""
    made: list[DaemonProc] = []

    def make(extra: dict[str, Any] | None = None, env: dict[str, str] | None = None, start: bool = True,
             name: str = "d", backbone: dict[str, Any] | None = None) -> DaemonProc:
        root = tmp_path / f"{name}{len(made)}"
        root.mkdir()
        config = merge(BASE_CONFIG, extra or {})
        if backbone is not None:
            config["backbone"] = dict(backbone)
        d = DaemonProc(root, config, env or {})
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait(5)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon for the read-mostly tests of a module."""
    root = tmp_path_factory.mktemp("shared")
    d = DaemonProc(root, BASE_CONFIG).start()
    yield d
    d.stop()


def free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A real mosquitto on a loopback port; ``kill`` and ``start`` again keep the port."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)  # user -> password; none = anonymous allowed
    tls: tuple[Path, Path] | None = None  # (certfile, keyfile): the listener speaks TLS only

    def start(self, timeout: float = 10.0) -> Broker:
        conf = self.root / "mosquitto.conf"
        auth = "allow_anonymous true\n"
        if self.users:
            passwd = self.root / "mosquitto.passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
            auth = f"allow_anonymous false\npassword_file {passwd}\n"
        # Run as whoever runs the tests: as root, mosquitto would switch to its own user and could
        # not read a password file under pytest's private temp directory.
        user = pwd.getpwuid(os.getuid()).pw_name
        tls = f"certfile {self.tls[0]}\nkeyfile {self.tls[1]}\n" if self.tls else ""
        conf.write_text(f"listener {self.port} 127.0.0.1\n{tls}{auth}persistence false\nuser {user}\n")
        with open(self.root / "mosquitto.log", "ab") as logf:
            try:
                self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
            except FileNotFoundError:
                raise AssertionError("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients "
                                     "(make test does this)") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socketlib.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"mosquitto exited: {(self.root / 'mosquitto.log').read_text()}") from None
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto broker on a free loopback port for one test. ``make test`` installs the
    Debian package when it is missing; without it this fixture fails, it never skips."""
    b = Broker(tmp_path).start()
    yield b
    b.kill()
