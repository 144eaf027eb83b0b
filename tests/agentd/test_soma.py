"""Soma: readings -> charges and a felt label from configured ranges; payload validation; and, in a
real daemon, the ``condition`` op: the felt state in ``status`` and ``condition`` events, a breath
that shortens when something is out of range, the SENSE observation fed to the model as training
renders it and remembered as a notable change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from agentd.client import Client, RequestError
from agentd.config import ConfigError, SomaSection
from agentd.mqtt import parse_payload
from agentd.soma import BadReading, Soma, parse_readings
from models import transcript

RANGES = {"voltage": [11.0, 13.0], "latency": [0.0, 200.0]}


def soma() -> Soma:
    return Soma(SomaSection(ranges=RANGES, alert_charge=0.4, urgent_charge=0.8, alert_breath_factor=0.5,
                            urgent_breath_factor=0.25, calm_pause_factor=2.0))


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if last := pred():
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}")


def test_charges_and_labels_follow_the_ranges() -> None:
    s = soma()
    assert s.update({"voltage": 12.0, "latency": 50}).label == "calm" and s.felt.charge == 0
    f = s.update({"voltage": 13.2})  # just out of range: alert, half charged
    assert f.label == "alert" and f.charges["voltage"] == pytest.approx(0.55) and f.values["latency"] == 50
    f = s.update({"voltage": 10.0})  # half a range-width below: charge 0.75, still alert
    assert f.label == "alert" and f.charge == pytest.approx(0.75)
    f = s.update({"voltage": 8.0})  # 1.5 widths below: fully charged
    assert f.label == "urgent" and f.charge == 1.0 and f.out_of_range() == ("voltage",)
    assert s.update({"voltage": 12.5}).label == "calm"
    assert s.update({"humidity": 1e6}).label == "calm", "a reading without a range is shown, never charged"
    assert s.updates == 6 and s.felt.values["humidity"] == 1e6


def test_the_same_readings_always_give_the_same_felt_state() -> None:
    a, b = soma(), soma()
    for readings in ({"voltage": 14.1}, {"latency": 900.0}, {"voltage": 12.0}, {"latency": 10.0}):
        assert a.update(readings) == b.update(readings)


def test_breath_factors() -> None:
    s = soma()
    s.update({"voltage": 12.0})
    assert s.breath_factors(idle=True) == (1.0, 2.0) and s.breath_factors(idle=False) == (1.0, 1.0)
    s.update({"voltage": 13.5})
    assert s.breath_factors(idle=True) == (0.5, 1.0), "alert: faster, and no long rest"
    s.update({"voltage": 100.0})
    assert s.breath_factors(idle=True) == (0.25, 1.0)


def test_soma_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"soma\.ranges\.voltage"):
        SomaSection(ranges={"voltage": [13.0, 11.0]})
    with pytest.raises(ConfigError, match="soma.urgent_breath_factor"):
        SomaSection(alert_breath_factor=0.3, urgent_breath_factor=0.6)
    with pytest.raises(ConfigError, match="soma.alert_charge"):
        SomaSection(alert_charge=0.9, urgent_charge=0.8)


def test_observation_only_on_notable_change_and_as_training_renders_it() -> None:
    s = soma()
    assert not s.observation_due(), "nothing sensed yet"
    s.update({"voltage": 12.0})
    assert s.observation_due()
    text = s.observation()
    assert text == transcript.sense_text({"voltage": 12.0}, {"voltage": (11.0, 13.0), "latency": (0.0, 200.0)}, "calm")
    s.update({"voltage": 12.1})
    assert not s.observation_due(), "a calm reading moving within its range is not news"
    s.update({"voltage": 14.0})
    assert s.observation_due()
    obs = s.observation()
    assert "voltage=14.0 high" in obs and obs.endswith("felt: alert") and not s.observation_due()
    s.update({"latency": 300.0})
    assert s.observation_due(), "another reading going out of range is news even at the same label"


def test_parse_readings_refuses_each_kind_of_bad_value() -> None:
    bad = {"not_object": [1, 2], "empty": {}, "bad_name": {"9lives": 1}, "bool": {"x": True},
           "nested": {"x": {"y": 1}}, "not_number": {"x": "12"}, "nan": {"x": float("nan")}, "inf": {"x": float("inf")},
           "too_many": {f"r{i}": i for i in range(300)}}
    for reason, obj in bad.items():
        with pytest.raises(BadReading) as exc:
            parse_readings(obj)
        assert exc.value.reason == reason, (reason, exc.value)
    with pytest.raises(BadReading) as exc:
        parse_readings({"x": 10**400})
    assert exc.value.reason == "inf"
    assert parse_readings({"a": 1, "b.c-d_e": -2.5}) == {"a": 1.0, "b.c-d_e": -2.5}


def test_parse_payload_topics_and_encodings() -> None:
    assert parse_payload("agentd/conditions", b'{"voltage": 12}', "agentd", 1024) == {"voltage": 12.0}
    assert parse_payload("agentd/conditions/voltage", b" 12.5\n", "agentd", 1024) == {"voltage": 12.5}
    cases = [("agentd/conditions", b"\xff\xfe", "not_utf8"), ("agentd/conditions", b"{", "not_json"),
             ("agentd/conditions", b'{"x": NaN}', "nan"), ("agentd/conditions/x", b"-Infinity", "inf"),
             ("agentd/conditions/x", b"", "empty"), ("agentd/conditions/a/b", b"1", "bad_topic"),
             ("agentd/conditions/x", b"twelve", "not_number"), ("agentd/conditions", b"x" * 2000, "oversized"),
             ("agentd/conditions/9x", b"1", "bad_name")]
    for topic, payload, reason in cases:
        with pytest.raises(BadReading) as exc:
            parse_payload(topic, payload, "agentd", 1024)
        assert exc.value.reason == reason, (topic, payload, exc.value)


# -- in a real daemon ----------------------------------------------------------------------------

def breaths_in(d: Any, seconds: float) -> int:
    start = d.request("status")["breath"]
    time.sleep(seconds)
    return d.request("status")["breath"] - start


def test_condition_op_status_events_and_a_shorter_breath(daemon_factory: Any) -> None:
    d = daemon_factory({"soma": {"ranges": {"temperature": [10.0, 45.0]}}})
    r = d.request("condition", values={"temperature": 30})
    assert r["accepted"] == 1 and r["soma"]["label"] == "calm" and r["soma"]["charge"] == 0.0
    turns = wait_for(lambda: d.request("status")["turns"], what="the first reading is news: a turn shows it")
    wait_for(lambda: d.request("status")["soma"]["pause_factor"] == 2.0, what="calm and idle: a long rest")
    assert d.request("status")["turns"] == turns == 1
    calm = breaths_in(d, 2.0)  # PAUSE 0.5 s * 2

    async def alert() -> list[dict[str, Any]]:
        async with Client(d.socket_path) as c:
            await c.request("subscribe")
            r = await c.request("condition", values={"temperature": 50})
            assert r["soma"]["label"] == "alert" and r["soma"]["charge"] == pytest.approx(0.5714, abs=1e-4)
            async with asyncio.timeout(10):
                return [ev async for ev in _until(c.events(), lambda ev: ev.get("event") == "condition")]

    events = asyncio.run(alert())
    ev = events[-1]
    assert ev["values"] == {"temperature": 50.0} and ev["soma"]["label"] == "alert"
    assert ev["soma"]["charges"] == {"temperature": pytest.approx(0.5714, abs=1e-4)}
    st = wait_for(lambda: (s := d.request("status"))["turns"] == turns + 1 and s, what="the alert's turn")
    assert st["soma"]["label"] == "alert" and st["soma"]["values"] == {"temperature": 50.0}
    assert st["soma"]["breath_factor"] == 0.5 and st["soma"]["readings"]["socket"] == 2
    wait_for(lambda: d.request("status")["soma"]["pause_s"] == 0.25, what="alert: PAUSE 0.5 s * 0.5")
    fast = breaths_in(d, 2.0)
    assert fast >= 2 * max(calm, 1), f"the breath did not shorten: {calm} breaths calm, {fast} alert in 2 s"
    assert d.request("status")["turns"] == st["turns"], "a steady alert is shown once, not every breath"

    for bad, code in [({}, "missing_field"), ({"values": {"t": "hot"}}, "bad_field"), ({"values": []}, "bad_field"),
                      ({"values": {"t": float("inf")}}, "bad_field"), ({"values": {}}, "bad_field"),
                      ({"values": {"no spaces": 1}}, "bad_field")]:
        with pytest.raises(RequestError) as exc:
            d.request("condition", **bad)
        assert exc.value.code == code, (bad, exc.value)
    st = d.request("status")
    assert st["soma"]["values"] == {"temperature": 50.0}, "refused readings change nothing"
    assert st["mqtt"] == {"enabled": False, "link": "off"}


async def _until(events: Any, pred: Callable[[dict[str, Any]], bool]) -> Any:
    async for ev in events:
        yield ev
        if pred(ev):
            return


@pytest.mark.slow
def test_a_notable_change_is_shown_to_the_model_and_remembered(daemon_factory: Any) -> None:
    d = daemon_factory({"memory": {"enabled": True, "recall_k": 0}, "soma": {"ranges": {"voltage": [11.0, 13.0]}}})
    position = d.request("status")["position"]
    d.request("condition", values={"voltage": 13.5})
    text = transcript.sense_text({"voltage": 13.5}, {"voltage": (11.0, 13.0)}, "alert")
    hits = wait_for(lambda: [h for h in d.request("memory.search", query="voltage high", k=5)["results"]
                             if h["kind"] == "condition"], what="the condition memory")
    assert hits[0]["text"] == text and hits[0]["source"] == "soma"
    assert d.request("status")["position"] > position, "the SENSE observation was fed to the model"
    d.request("condition", values={"voltage": 13.6})  # same label, same reading out of range: not news
    time.sleep(1.5)
    kinds = [h["kind"] for h in d.request("memory.search", query="voltage", k=20)["results"]]
    assert kinds.count("condition") == 1
