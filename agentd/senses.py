"""The daemon's senses: readings from MQTT and the ``condition`` op go through Soma into the loop.

``SenseService`` (an async context manager) owns Soma and, when ``[mqtt] enabled``, the MQTT bridge.
The daemon wires it in at a few points:

- ``feed(readings, source)``: every accepted batch of readings; never blocks. A change of label
  re-paces the breath at once (and wakes a resting clock when it gets more charged);
- the agent's INHALE asks ``sense()`` for at most one SENSE observation per breath, only when the
  felt label or the set of out-of-range readings changed; the turn it starts remembers it (kind
  ``condition`` in ``[memory] remember``), so notable changes reach long-term memory;
- the agent's PAUSE hook sets the BreathClock's factors from Soma and whether the breath was idle;
- the bus gets a ``condition`` event at once when the label changes, else at most every
  ``EVENT_INTERVAL_S`` while readings flow; SPEAK and the status go out on MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import structlog

from agentd.agent import Agent, Observation
from agentd.breath import Phase
from agentd.config import Config
from agentd.events import EventBus, Subscription
from agentd.mqtt import MqttBridge
from agentd.server import OpError, field
from agentd.soma import BadReading, Felt, Soma, parse_readings
from models import transcript

log = structlog.get_logger("agentd.senses")

EVENT_INTERVAL_S = 0.25  # condition events while readings stream: a console needs no more
LABEL_RANK = {"calm": 0, "alert": 1, "urgent": 2}


class SenseService:
    OPS = ("condition",)

    def __init__(self, config: Config, agent: Agent, bus: EventBus) -> None:
        self.config = config
        self.agent = agent
        self.bus = bus
        self.soma = Soma(config.soma)
        self.mqtt: MqttBridge | None = None
        self.readings = {"socket": 0, "mqtt": 0}  # readings accepted per source
        self._dirty = False
        self._last_turns = agent.turns
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SenseService:
        self.agent.senses.append(self.sense)
        self.agent.on_pause.append(self._on_pause)
        self._tasks.append(asyncio.create_task(self._flush_events(), name="senses.events"))
        if self.config.mqtt.enabled:
            self.mqtt = await self._stack.enter_async_context(MqttBridge(self.config.mqtt, self.feed, self.mqtt_status))
            # SPEAK goes out whole (the segment's end event), and the retained status is refreshed
            # at each PAUSE so the phase and health it shows are never more than a breath old.
            self._sub = self.bus.subscribe(
                lambda ev: (ev.get("event") == "speak" and bool(ev.get("end")))
                or (ev.get("event") == "phase" and ev.get("phase") == Phase.PAUSE.value),
                name="mqtt")
            self._tasks.append(asyncio.create_task(self._forward_to_mqtt(), name="mqtt.forward"))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self._stack.aclose()  # the bridge says "offline" while the link is still there
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sub is not None:
            self._sub.close()

    # -- input -----------------------------------------------------------------------------------
    def feed(self, readings: dict[str, float], source: str) -> Felt:
        """Merge readings into Soma (``BadReading`` when Soma refuses them); a change of label
        re-paces the breath now rather than at the next PAUSE."""
        before = self.soma.felt.label
        felt = self.soma.update(readings)
        self.readings[source] = self.readings.get(source, 0) + len(readings)
        if felt.label != before:
            log.info("soma_changed", felt=felt.label, was=before, charge=round(felt.charge, 4),
                     out_of_range=list(felt.out_of_range()), source=source)
            self.agent.clock.factor, _ = self.soma.breath_factors(idle=False)
            self._publish()
            if LABEL_RANK[felt.label] > LABEL_RANK[before]:
                self.agent.clock.wake()  # something got worse: do not sleep through it
        else:
            self._dirty = True
        return felt

    def sense(self) -> Observation | None:
        """At INHALE: the SENSE observation when Soma changed notably since last shown."""
        if not self.soma.observation_due():
            return None
        text = self.soma.observation()
        clipped = transcript.clip(text, self.config.agent.observation_max_bytes)
        return Observation("condition", text, source="soma", tokens=self.agent.backbone.tokenizer.wrap("SENSE", clipped))

    def _on_pause(self) -> None:
        idle = self.agent.turns == self._last_turns
        self._last_turns = self.agent.turns
        self.agent.clock.factor, self.agent.clock.pause_factor = self.soma.breath_factors(idle)

    # -- output ----------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._dirty = False
        felt = self.soma.felt.to_dict()
        values = felt.pop("values")
        self.bus.publish({"event": "condition", "values": values, "soma": felt})
        if self.mqtt is not None:
            self.mqtt.publish_status()

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(EVENT_INTERVAL_S)
            if self._dirty:
                self._publish()

    async def _forward_to_mqtt(self) -> None:
        assert self._sub is not None and self.mqtt is not None
        while True:
            ev = await self._sub.get()
            if ev["event"] == "speak":
                self.mqtt.publish_speak(ev.get("text", ""), turn=ev.get("turn"))
            else:
                self.mqtt.publish_status()

    def mqtt_status(self) -> dict[str, Any]:
        """The retained JSON status on ``<prefix>/status``: phase, Soma, health."""
        a = self.agent
        bridge = self.mqtt.status() if self.mqtt is not None else {}
        return {"state": "online", "phase": a.clock.phase.value, "breath": a.clock.breath, "turns": a.turns,
                "in_turn": a.in_turn, "soma": self.soma.felt.to_dict(),
                "health": {"inbox": len(a.inbox), "bus_dropped": self.bus.dropped,
                           "mqtt_received": bridge.get("received", 0), "mqtt_bad": bridge.get("bad_total", 0),
                           "mqtt_connects": bridge.get("connects", 0)}}

    # -- the socket op and status ----------------------------------------------------------------
    async def handle(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """``condition``: ``values`` (object of name -> number) through the same path as MQTT."""
        if op != "condition":
            raise OpError("unknown_op", f"unknown op {op!r}")
        values = field(req, "values", dict)
        try:
            readings = parse_readings(values)
            felt = self.feed(readings, source="socket")
        except BadReading as exc:
            raise OpError("bad_field", f"'values': {exc.message}") from exc
        return {"accepted": len(readings), "soma": felt.to_dict()}

    def status(self) -> dict[str, Any]:
        clock = self.agent.clock
        return {**self.soma.felt.to_dict(), "updates": self.soma.updates, "readings": dict(self.readings),
                "breath_factor": clock.factor, "pause_factor": clock.pause_factor,
                "pause_s": round(clock.duration(Phase.PAUSE), 4)}

    def mqtt_link(self) -> dict[str, Any]:
        """The ``mqtt`` section of ``status``: the bridge's link and counters, or that it is off."""
        return self.mqtt.status() if self.mqtt is not None else {"enabled": False, "link": "off"}
