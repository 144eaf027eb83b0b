"""The real `agentd start` subprocess over the real socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agentd.client import Client, ConnectionLost, RequestError
from tests.conftest import AGENTD, DaemonProc, merge


def test_status_reports_the_running_daemon(shared_daemon: DaemonProc) -> None:
    st = shared_daemon.request("status")
    assert st["state"] == "running" and st["backbone"] == "hyena"
    assert st["pid"] == shared_daemon.proc.pid  # type: ignore[union-attr]
    assert st["phase"] in ("inhale", "hold", "exhale", "pause")
    assert len(st["state_digest"]) == 64 and st["uptime_s"] >= 0 and st["turns"] >= 0


def test_chat_streams_events_with_the_request_id_then_done(shared_daemon: DaemonProc) -> None:
    async def go() -> list[dict]:
        async with Client(shared_daemon.socket_path) as c:
            return [ev async for ev in c.stream("chat", text="hello there")]

    events = asyncio.run(go())
    assert events[-1]["event"] == "done"
    result = events[-1]["result"]
    assert result["turn"] >= 1 and result["reason"] in ("wait", "eos", "max_tokens", "silence", "guard", "exec")
    assert all(ev["id"] == events[-1]["id"] for ev in events)
    waits = [ev for ev in events if ev["event"] == "wait"]
    assert len(waits) == 1 and waits[0]["turn"] == result["turn"]
    st = shared_daemon.request("status")
    assert st["turns"] >= result["turn"] and st["position"] > 0


def test_two_subscribers_both_see_phases_and_the_turn(shared_daemon: DaemonProc) -> None:
    async def go() -> tuple[list[dict], list[dict]]:
        async with Client(shared_daemon.socket_path) as a, Client(shared_daemon.socket_path) as b:
            await a.request("subscribe")
            await b.request("subscribe")
            async with Client(shared_daemon.socket_path) as talker:
                await talker.request("chat", text="anyone there?", timeout=60)

            async def collect(c: Client) -> list[dict]:
                seen: list[dict] = []
                async for ev in c.events():
                    seen.append(ev)
                    if ev["event"] == "wait":
                        return seen
                return seen

            return await asyncio.wait_for(collect(a), 30), await asyncio.wait_for(collect(b), 30)

    ea, eb = asyncio.run(go())
    for seen in (ea, eb):
        kinds = {ev["event"] for ev in seen}
        assert "phase" in kinds and "wait" in kinds


def test_second_start_is_refused_and_the_first_keeps_running(shared_daemon: DaemonProc) -> None:
    r = shared_daemon.cli("start", timeout=60)
    assert r.returncode == 1
    assert "already running" in r.stdout + r.stderr
    assert shared_daemon.socket_path.exists()
    assert shared_daemon.request("status")["state"] == "running"


def test_cli_status_and_chat(shared_daemon: DaemonProc) -> None:
    r = shared_daemon.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "running"
    r = shared_daemon.cli("chat", "what is 2 + 2?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the reply, or a "(no reply: reason)" line


MALFORMED: list[tuple[bytes, str]] = [
    (b"not json\n", "bad_json"), (b"{\n", "bad_json"), (b"{'op': 'status'}\n", "bad_json"), (b"[1, 2\n", "bad_json"),
    (b'{"op": "status",}\n', "bad_json"), (b"nul\n", "bad_json"), (b'{"op": "sta\n', "bad_json"), (b"{}}\n", "bad_json"),
    (b"\xff\xfe\n", "bad_utf8"), (b'{"op": "\xc3\x28"}\n', "bad_utf8"), (b"\x80abc\n", "bad_utf8"), (b'{"text": "\xed\xa0\x80"}\n', "bad_utf8"),
    (b"[]\n", "not_object"), (b"1\n", "not_object"), (b'"status"\n', "not_object"), (b"null\n", "not_object"),
    (b"true\n", "not_object"), (b"[{\"op\": \"status\"}]\n", "not_object"), (b"3.5\n", "not_object"),
    (b"{}\n", "missing_op"), (b'{"id": 1}\n', "missing_op"), (b'{"text": "hi"}\n', "missing_op"), (b'{"op": null}\n', "missing_op"),
    (b'{"op": 5}\n', "bad_field"), (b'{"op": ["status"]}\n', "bad_field"), (b'{"op": {"x": 1}}\n', "bad_field"),
    (b'{"op": true}\n', "bad_field"), (b'{"op": "status", "id": [1]}\n', "bad_field"), (b'{"op": "status", "id": {"a": 1}}\n', "bad_field"),
    (b'{"op": "status", "id": true}\n', "bad_field"), (b'{"op": "status", "id": 1.5}\n', "bad_field"),
    (b'{"op": "nope"}\n', "unknown_op"), (b'{"op": ""}\n', "unknown_op"), (b'{"op": "STATUS"}\n', "unknown_op"),
    (b'{"op": "chat "}\n', "unknown_op"), (b'{"op": "memory.add"}\n', "unavailable"), (b'{"op": "../etc/passwd"}\n', "unknown_op"),
    (b'{"op": "status\\u0000"}\n', "unknown_op"), (b'{"op": "\\ud83d\\ude00"}\n', "unknown_op"),
    (b'{"op": "chat"}\n', "missing_field"), (b'{"op": "chat", "id": 7}\n', "missing_field"), (b'{"op": "chat", "text": null}\n', "missing_field"),
    (b'{"op": "chat", "message": "hi"}\n', "missing_field"),
    (b'{"op": "chat", "text": 5}\n', "bad_field"), (b'{"op": "chat", "text": ["hi"]}\n', "bad_field"),
    (b'{"op": "chat", "text": {"a": 1}}\n', "bad_field"), (b'{"op": "chat", "text": true}\n', "bad_field"),
    (b'{"op": "chat", "text": ""}\n', "bad_field"), (b'{"op": "chat", "text": "   "}\n', "bad_field"),
    (b'{"op": "chat", "text": 1.5}\n', "bad_field"), (b'{"op": "chat", "text": false}\n', "bad_field"),
]


def test_fifty_malformed_requests_each_get_their_code(shared_daemon: DaemonProc) -> None:
    assert len(MALFORMED) >= 50

    async def go() -> list[str]:
        codes = []
        reader, writer = await asyncio.open_unix_connection(str(shared_daemon.socket_path))
        for raw, _ in MALFORMED:
            writer.write(raw)
            await writer.drain()
            ev = json.loads(await asyncio.wait_for(reader.readline(), 10))
            assert ev["event"] == "error" and ev["message"], ev
            codes.append(ev["code"])
        writer.write(b'{"op": "status", "id": "after"}\n')
        await writer.drain()
        ev = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        assert ev["event"] == "done" and ev["id"] == "after"
        return codes

    codes = asyncio.run(go())
    for (raw, want), got in zip(MALFORMED, codes, strict=True):
        assert got == want, f"{raw!r}: expected {want}, got {got}"
    assert shared_daemon.request("status")["errors"] >= len(MALFORMED)


def test_oversized_line_gets_line_too_long_and_the_connection_closes(shared_daemon: DaemonProc) -> None:
    async def go() -> dict:
        reader, writer = await asyncio.open_unix_connection(str(shared_daemon.socket_path))
        writer.write(b'{"op": "chat", "text": "' + b"x" * (1 << 20) + b'"}\n')
        try:
            await writer.drain()
        except ConnectionError:
            pass
        ev = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the daemon
        writer.close()
        return ev

    ev = asyncio.run(go())
    assert ev["event"] == "error" and ev["code"] == "line_too_long"
    assert shared_daemon.request("status")["state"] == "running"


def test_unknown_op_error_carries_the_id(shared_daemon: DaemonProc) -> None:
    async def go() -> None:
        async with Client(shared_daemon.socket_path) as c:
            with pytest.raises(RequestError) as err:
                await c.request("frobnicate")
            assert err.value.code == "unknown_op"

    asyncio.run(go())


def test_sigterm_exits_zero_removes_the_socket_and_notifies(daemon_factory, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    d = daemon_factory(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"})
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                return

    drain()
    assert "READY=1" in messages
    assert any(m.startswith("STATUS=") for m in messages)
    assert "WATCHDOG=1" in messages
    assert d.stop(signal.SIGTERM) == 0
    drain()
    sock.close()
    assert "STOPPING=1" in messages
    assert not d.socket_path.exists()
    assert '"daemon_stopped"' in d.log()


def test_stop_then_start_resumes_the_same_state(daemon_factory) -> None:
    d = daemon_factory()
    d.request("chat", text="remember this turn")
    before = d.request("status")
    r = d.cli("stop")
    assert r.returncode == 0, r.stderr
    d.start()
    after = d.request("status")
    assert after["state_digest"] == before["state_digest"]
    assert after["position"] == before["position"] and after["turns"] == before["turns"]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[daemon]\nlog_level = \"loud\"\n", "daemon.log_level"),
        ("[breath]\npause_s = -1\n", "breath.pause_s"),
        ("[socket]\nmode = \"rw\"\n", "socket.mode"),
        ("[sandbox]\nwall_s = \"ten\"\n", "sandbox.wall_s"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[backbone]\ncolour = \"red\"\n", "backbone.colour"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    for cmd in (["start"], ["config", "check"]):
        r = subprocess.run([AGENTD, "--config", str(path), *cmd], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert key in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was touched


def test_environment_override_is_validated_too(tmp_path: Path) -> None:
    env = {**os.environ, "AGENTD_MQTT__PORT": "70000"}
    r = subprocess.run([AGENTD, "config", "check"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "mqtt.port" in r.stderr


def test_default_config_checks_ok() -> None:
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([AGENTD, "--config", str(root / "config.toml"), "config", "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout


@pytest.mark.parametrize("cmd", [["status"], ["chat", "hi"], ["stop"]])
def test_client_commands_without_a_daemon_say_so_in_one_line(tmp_path: Path, cmd: list[str]) -> None:
    env = {**os.environ, "AGENTD_DAEMON__RUN_DIR": str(tmp_path / "run"), "AGENTD_DAEMON__DATA_DIR": str(tmp_path / "d")}
    r = subprocess.run([AGENTD, *cmd], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert "not running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_connection_lost_is_reported_when_the_daemon_goes(daemon_factory) -> None:
    d = daemon_factory()

    async def go() -> None:
        async with Client(d.socket_path) as c:
            await c.request("subscribe")
            d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            with pytest.raises(ConnectionLost):
                async for _ in c.events():
                    pass

    asyncio.run(asyncio.wait_for(go(), 60))


def _log_events(d: DaemonProc, name: str) -> list[dict]:
    out = []
    for line in d.log().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name:
            out.append(ev)
    return out


def _wait_for_log(d: DaemonProc, name: str, count: int, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := _log_events(d, name)) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {name!r} in the log after {timeout}s:\n{d.log()}")


def test_sighup_applies_breath_and_log_level_and_names_what_needs_a_restart(daemon_factory) -> None:
    d = daemon_factory()
    d.config = merge(d.config, {"breath": {"pause_s": 0.25}, "daemon": {"log_level": "debug"},
                                "agent": {"max_segments_per_turn": 3}})
    d.write_config()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    (ev,) = _wait_for_log(d, "config_reloaded", 1)
    assert ev["needs_restart"] == ["agent"] and "breath" in ev["applied"]
    assert not _log_events(d, "client_connected")  # a debug event: silent at info...
    assert d.request("status")["state"] == "running"
    _wait_for_log(d, "client_connected", 1)  # ...logged once the reload set debug

    d.config_path.write_text("[breath]\npause_s = \"soon\"\n")  # a broken edit: kept running on the old one
    d.proc.send_signal(signal.SIGHUP)
    (bad,) = _wait_for_log(d, "reload_failed", 1)
    assert "breath.pause_s" in bad["error"]
    assert d.request("chat", text="still here?")["turn"] >= 1


def test_cli_condition_feeds_soma_and_refuses_bad_readings(daemon_factory) -> None:
    d = daemon_factory({"soma": {"ranges": {"voltage": [11.0, 13.0]}}})
    r = d.cli("condition", "voltage=12", "fan=1200")
    assert r.returncode == 0 and "accepted 2 reading(s); felt calm" in r.stdout, r.stderr
    r = d.cli("condition", "voltage=20")
    assert r.returncode == 0 and "felt urgent" in r.stdout
    r = d.cli("condition", "voltage=high")
    assert r.returncode == 2 and "'high' is not a number" in r.stderr
    r = d.cli("condition", "voltage=nan")
    assert r.returncode == 1 and "NaN" in r.stderr, "the daemon's own check names the problem"
    assert d.request("status")["soma"]["values"] == {"voltage": 20.0, "fan": 1200.0}
