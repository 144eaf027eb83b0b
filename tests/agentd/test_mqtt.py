"""The MQTT bridge with a real mosquitto on a loopback port and a real daemon subprocess: readings in
(JSON objects and bare numbers) reach Soma, ``status`` and the socket, and the model's SPEAK comes
out on ``<prefix>/speak``; the broker down at start, killed and restarted; the retained status and
the last will ``offline``; bad payloads counted per reason and logged once, never fatal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from agentd.client import Client, ClientError
from tests.conftest import Broker, DaemonProc

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
PREFIX = "t"


def mqtt_daemon(daemon_factory: Any, mosquitto: Broker, scripted: bool = False, **extra: Any) -> DaemonProc:
    cfg: dict[str, Any] = {"mqtt": {"enabled": True, "host": "127.0.0.1", "port": mosquitto.port, "topic_prefix": PREFIX,
                                    "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "max_payload_bytes": 1024},
                           "soma": {"ranges": {"voltage": [11.0, 13.0], "latency": [0.0, 200.0]}}, **extra}
    if not scripted:
        return daemon_factory(cfg)
    # The test double SPEAKs "forty-two" each turn (tests/plugins/agentd_scripted.py).
    return daemon_factory(cfg, env={"PYTHONPATH": PLUGINS},
                          backbone={"name": "scripted", "max_tokens": 64, "options": {"execs": 0, "reply": "forty-two"}})


def pub(mosquitto: Broker, topic: str, payload: bytes) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-t", topic, "-s"],
                   input=payload, check=True, timeout=10)


def retained(mosquitto: Broker, topic: str) -> bytes:
    """The retained message on ``topic`` (mosquitto_sub gets it at once, or gives up empty after 2 s)."""
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-t", topic, "-C", "1", "-W", "2"],
                       capture_output=True, timeout=10)
    return r.stdout.strip()


def retained_status(mosquitto: Broker) -> dict[str, Any]:
    raw = retained(mosquitto, f"{PREFIX}/status")
    return json.loads(raw) if raw.startswith(b"{") else {"raw": raw}


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if last := pred():
                return last
        except (ClientError, OSError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or pred}; last={last!r}")


def link(d: DaemonProc) -> str:
    return str(d.request("status", timeout=10)["mqtt"]["link"])


def test_readings_reach_status_and_the_socket_and_the_models_speak_comes_out(daemon_factory: Any, mosquitto: Broker) -> None:
    d = mqtt_daemon(daemon_factory, mosquitto, scripted=True)
    wait_for(lambda: link(d) == "up", what="link up")

    async def go() -> tuple[list[dict[str, Any]], bytes]:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as mq, Client(d.socket_path) as c:
            await mq.subscribe(f"{PREFIX}/speak", qos=1)
            await c.request("subscribe")
            await mq.publish(f"{PREFIX}/conditions", json.dumps({"voltage": 12.0, "latency": 20}), qos=1)
            await mq.publish(f"{PREFIX}/conditions/voltage", b"16.5", qos=1)  # 1.75 range-widths out: urgent
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                async for ev in c.events():
                    if ev.get("event") == "condition":
                        seen.append(ev)
                        if ev["soma"]["label"] == "urgent":
                            break
                # No chat: the SENSE observation alone starts a turn, and its SPEAK goes out on MQTT.
                async for msg in mq.messages:
                    return seen, bytes(msg.payload)  # type: ignore[arg-type]
        raise AssertionError("no message")

    seen, spoken = asyncio.run(go())
    assert seen[-1]["values"] == {"voltage": 16.5, "latency": 20.0} and seen[-1]["soma"]["charge"] == 1.0
    assert spoken == b"forty-two"
    st = d.request("status")
    assert st["soma"]["label"] == "urgent" and st["soma"]["values"] == {"voltage": 16.5, "latency": 20.0}
    assert st["soma"]["breath_factor"] == 0.25, "urgent: the breath speeds up"
    assert st["turns"] >= 1 and st["mqtt"]["accepted"] == 2 and st["mqtt"]["readings"] == 3
    assert st["mqtt"]["published"] >= 2 and st["mqtt"]["bad_total"] == 0
    status = wait_for(lambda: (s := retained_status(mosquitto)).get("soma", {}).get("label") == "urgent" and s,
                      what="the retained status")
    assert status["state"] == "online" and status["soma"]["values"]["voltage"] == 16.5 and "phase" in status
    assert status["health"]["mqtt_connects"] == 1

    # A burst is coalesced: one felt state, the latest value per name, no queue of observations.
    turns = d.request("status")["turns"]

    async def burst() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as mq:
            for i in range(500):
                await mq.publish(f"{PREFIX}/conditions/latency", str(100 + i % 50).encode(), qos=1)
            await mq.publish(f"{PREFIX}/conditions", json.dumps({"latency": 42.5}), qos=1)

    asyncio.run(burst())
    st = wait_for(lambda: (s := d.request("status"))["soma"]["values"]["latency"] == 42.5 and s, what="the last value")
    assert st["mqtt"]["accepted"] == 503 and st["mqtt"]["readings"] == 504 and st["mqtt"]["incoming_dropped"] == 0
    assert st["inbox"] == 0 and st["turns"] - turns <= 2, "in-range latency wobbles are not news for the model"


def test_broker_down_at_start_then_killed_and_back(daemon_factory: Any, mosquitto: Broker) -> None:
    mosquitto.kill()
    d = mqtt_daemon(daemon_factory, mosquitto)
    st = wait_for(lambda: (s := d.request("status"))["mqtt"]["last_error"] and s, what="a failed connect")
    assert st["state"] == "running" and st["mqtt"]["link"] in ("down", "connecting") and st["mqtt"]["connects"] == 0
    mosquitto.start()
    wait_for(lambda: link(d) == "up", what="first connect")
    pub(mosquitto, f"{PREFIX}/conditions/latency", b"150")
    wait_for(lambda: d.request("status")["soma"]["values"].get("latency") == 150.0, what="first reading")

    mosquitto.kill()
    wait_for(lambda: link(d) == "down", what="link down")
    assert d.request("chat", text="are you there?")["turn"] >= 1, "the daemon carries on without its broker"
    t0 = time.monotonic()
    for _ in range(20):  # status answers at once while the bridge retries
        assert d.request("status", timeout=5)["mqtt"]["link"] in ("down", "connecting")
    assert time.monotonic() - t0 < 10
    mosquitto.start()  # a fresh broker with no retained messages: the daemon must publish its status again
    wait_for(lambda: d.request("status")["mqtt"]["connects"] == 2, what="reconnect")
    pub(mosquitto, f"{PREFIX}/conditions/latency", b"175")
    st = wait_for(lambda: (s := d.request("status"))["soma"]["values"]["latency"] == 175.0 and s, what="readings again")
    assert st["mqtt"]["disconnects"] == 1 and st["mqtt"]["link"] == "up"
    status = wait_for(lambda: (s := retained_status(mosquitto)).get("soma", {}).get("values", {}).get("latency") == 175.0
                      and s, what="the retained status, published again to the fresh broker")
    assert status["state"] == "online" and status["health"]["mqtt_connects"] == 2
    assert d.proc is not None and d.proc.poll() is None


def test_last_will_reads_offline_after_kill9_and_a_clean_stop_says_so_too(daemon_factory: Any, mosquitto: Broker) -> None:
    d = mqtt_daemon(daemon_factory, mosquitto)
    wait_for(lambda: retained_status(mosquitto).get("state") == "online", what="online")
    d.kill9()
    wait_for(lambda: retained(mosquitto, f"{PREFIX}/status") == b"offline", timeout=60, what="the last will")

    d.start()
    wait_for(lambda: retained_status(mosquitto).get("state") == "online", what="online again")
    assert d.stop() == 0
    assert retained(mosquitto, f"{PREFIX}/status") == b"offline"
    assert '"mqtt.closed"' in d.log()


BAD_PAYLOADS: list[tuple[str, bytes, str]] = [
    ("conditions", b"\xff\xfe\x00", "not_utf8"),
    ("conditions", b'{"voltage": "\xe9"}', "not_utf8"),  # Latin-1, not UTF-8
    ("conditions", b"{not json", "not_json"),
    ("conditions", b'{"voltage": 12', "not_json"),
    ("conditions", b"", "not_json"),
    ("conditions", b"[1, 2, 3]", "not_object"),
    ("conditions", b'"voltage"', "not_object"),
    ("conditions", b"12", "not_object"),
    ("conditions", b"{}", "empty"),
    ("conditions", b'{"9volt": 1}', "bad_name"),
    ("conditions", b'{"a b": 1}', "bad_name"),
    ("conditions", b'{"voltage": true}', "bool"),
    ("conditions", b'{"voltage": {"v": 1}}', "nested"),
    ("conditions", b'{"voltage": [1]}', "nested"),
    ("conditions", b'{"voltage": "12"}', "not_number"),
    ("conditions", b'{"voltage": null}', "not_number"),
    ("conditions", b'{"voltage": NaN}', "nan"),
    ("conditions", b'{"voltage": Infinity}', "inf"),
    ("conditions", b'{"voltage": 1e999}', "inf"),
    ("conditions", json.dumps({f"r{i}": i for i in range(300)}).encode(), "oversized"),
    ("conditions/voltage", b"twelve", "not_number"),
    ("conditions/voltage", b"0x10", "not_number"),
    ("conditions/voltage", b"   ", "empty"),
    ("conditions/volt/age", b"12", "bad_topic"),
    ("conditions/9volt", b"12", "bad_name"),
]


def test_bad_payloads_are_counted_per_reason_logged_once_and_dropped(daemon_factory: Any, mosquitto: Broker) -> None:
    assert len(BAD_PAYLOADS) >= 20
    d = mqtt_daemon(daemon_factory, mosquitto)
    wait_for(lambda: link(d) == "up", what="link up")

    async def go() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as mq:
            for _ in range(2):
                for sub, payload, _ in BAD_PAYLOADS:
                    await mq.publish(f"{PREFIX}/{sub}", payload, qos=1)
            await mq.publish(f"{PREFIX}/conditions/voltage", b"12.25", qos=1)  # and a good one after them

    asyncio.run(go())
    st = wait_for(lambda: (s := d.request("status"))["soma"]["values"].get("voltage") == 12.25 and s, what="good reading")
    expected: dict[str, int] = {}
    for _, _, reason in BAD_PAYLOADS:
        expected[reason] = expected.get(reason, 0) + 2
    m = st["mqtt"]
    assert m["bad"] == expected and m["bad_total"] == 2 * len(BAD_PAYLOADS)
    assert m["received"] == 2 * len(BAD_PAYLOADS) + 1 and m["accepted"] == 1 and m["link"] == "up" and m["connects"] == 1
    assert st["soma"]["values"] == {"voltage": 12.25}, "nothing from a bad payload reached Soma"
    assert st["state"] == "running" and d.request("chat", text="still fine?")["turn"] >= 1
    logged = [json.loads(line) for line in d.log().splitlines() if '"mqtt.bad_payload"' in line]
    assert sorted(e["reason"] for e in logged) == sorted(expected), "each reason logged once per minute"


def test_username_and_password_file(daemon_factory: Any, mosquitto: Broker, tmp_path: Path) -> None:
    mosquitto.kill()
    mosquitto.users = {"sensor": "s3cret"}
    mosquitto.start()
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("s3cret\n")  # the trailing newline an editor leaves is not part of the password
    bad.write_text("guess")
    d = mqtt_daemon(daemon_factory, mosquitto, mqtt={"enabled": True, "port": mosquitto.port, "topic_prefix": PREFIX,
                                                     "username": "sensor", "password_file": str(good)})
    wait_for(lambda: link(d) == "up", what="link up with the password")
    e = mqtt_daemon(daemon_factory, mosquitto, mqtt={"enabled": True, "port": mosquitto.port, "topic_prefix": PREFIX,
                                                     "username": "sensor", "password_file": str(bad),
                                                     "reconnect_min_s": 0.1, "reconnect_max_s": 0.2})
    st = wait_for(lambda: (s := e.request("status"))["mqtt"]["last_error"] and s, what="a refused connect")
    assert st["mqtt"]["connects"] == 0 and "authori" in st["mqtt"]["last_error"].lower(), st["mqtt"]
    assert st["state"] == "running"


def test_a_missing_password_file_stops_start_up_naming_the_key(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"mqtt": {"enabled": True, "username": "u", "password_file": str(tmp_path / "nope")}}, start=False)
    d.write_config()
    r = d.cli("config", "check")
    assert r.returncode == 2 and "mqtt.password_file" in r.stderr and "nope" in r.stderr



def self_signed(root: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key (openssl, as a user would make one)."""
    cert, key = root / "broker.crt", root / "broker.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_with_the_brokers_ca_and_a_clear_error_without_it(daemon_factory: Any, mosquitto: Broker, tmp_path: Path) -> None:
    mosquitto.kill()
    cert, key = self_signed(tmp_path)
    mosquitto.tls = (cert, key)
    mosquitto.start()
    tls = {"enabled": True, "host": "127.0.0.1", "port": mosquitto.port, "topic_prefix": PREFIX, "tls": True,
           "reconnect_min_s": 0.1, "reconnect_max_s": 0.2}
    d = mqtt_daemon(daemon_factory, mosquitto, mqtt={**tls, "ca_file": str(cert)})
    wait_for(lambda: link(d) == "up", what="link up over TLS")
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "--cafile", str(cert), "-q", "1",
                    "-t", f"{PREFIX}/conditions/voltage", "-m", "12.5"], check=True, timeout=10)
    wait_for(lambda: d.request("status")["soma"]["values"].get("voltage") == 12.5, what="a reading over TLS")
    # Without the broker's CA (the system's bundle) the certificate is refused, said in status, and
    # the daemon runs on.
    e = mqtt_daemon(daemon_factory, mosquitto, mqtt=tls)
    st = wait_for(lambda: (s := e.request("status"))["mqtt"]["last_error"] and s, what="a refused certificate")
    assert st["mqtt"]["connects"] == 0 and "certificate" in st["mqtt"]["last_error"].lower(), st["mqtt"]
    assert st["state"] == "running" and link(e) != "up"
