"""The MQTT bridge: sensor readings in, SPEAK and a retained status out (aiomqtt 2.x).

Topics (``P`` is ``[mqtt] topic_prefix``):
  in   ``P/conditions``         a JSON object of readings, ``{"temperature": 71.5, "latency": 12}``
       ``P/conditions/<name>``  a bare number, ``71.5``            (both subscribed with ``P/conditions/#``, QoS 1)
  out  ``P/speak``              each SPEAK segment's text, UTF-8, QoS 1
       ``P/status``             retained JSON (``state: online``, phase, soma, health); the retained
                                last will, and the last word of a clean stop, is the plain text ``offline``

``MqttBridge`` is an async context manager that owns one reconnect loop. aiomqtt's client is
reusable but not reentrant, so the loop is ``while True: async with client: ...`` with capped
exponential backoff and jitter between attempts; a broker that is down or goes away is only ever a
link state in ``status``, never a reason for the daemon to stop. Readings go to ``on_readings``
synchronously (Soma coalesces them, so nothing queues up behind a burst); a payload that cannot be
used is counted per reason, logged at most once per reason per minute, and dropped. Outgoing
messages never block the caller: SPEAK waits in a bounded queue while the broker is away, and the
status is a flag, so only the newest status is ever sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import aiomqtt
import structlog

from agentd.config import MqttSection
from agentd.soma import BadReading, check_name, check_value, parse_readings

log = structlog.get_logger("agentd.mqtt")

OFFLINE = b"offline"
INCOMING_QUEUE = 10_000  # messages received but not yet handled; a bound so a flood cannot eat memory
PUBLISH_TIMEOUT_S = 5.0  # a PUBACK later than this means the link is gone: reconnect
CLOSE_TIMEOUT_S = 3.0  # the clean stop (publish offline, disconnect) gets this long
BAD_LOG_INTERVAL_S = 60.0  # each bad-payload reason is logged at most once per interval

ReadingsSink = Callable[[dict[str, float], str], object]

# paho and aiomqtt log through the standard library, outside structlog, one line per discarded
# message when flooded; the bridge counts those itself, so only their errors get through.
_paho_log = logging.getLogger("agentd.mqtt.paho")
_paho_log.setLevel(logging.ERROR)


class _CountingQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, bounded; a message it has to discard is counted on the bridge."""

    def __init__(self, bridge: MqttBridge, maxsize: int) -> None:
        super().__init__(maxsize)
        self._bridge = bridge

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.full():
            self._bridge.incoming_dropped += 1
        super().put_nowait(item)  # raises QueueFull when full: aiomqtt catches it and drops the message


class MqttBridge:
    def __init__(self, section: MqttSection, on_readings: ReadingsSink, status_payload: Callable[[], dict[str, Any]]) -> None:
        self.section = section
        self.on_readings = on_readings
        self.status_payload = status_payload
        prefix = section.topic_prefix.rstrip("/")
        self.conditions_topic = f"{prefix}/conditions"
        self.speak_topic = f"{prefix}/speak"
        self.status_topic = f"{prefix}/status"
        self.client_id = section.client_id or f"agentd-{socket.gethostname()}-{os.getpid()}"
        self.link = "connecting"  # connecting | up | down (waiting to retry) | closed
        self.connects = 0
        self.disconnects = 0
        self.last_error = ""
        self.retry_at: float | None = None
        self.received = 0  # messages on the conditions topics, good or bad
        self.accepted = 0  # messages whose readings reached Soma
        self.readings = 0  # readings in those messages
        self.bad: collections.Counter[str] = collections.Counter()
        self.published = 0
        self.speak_dropped = 0
        self.incoming_dropped = 0
        self._speak: collections.deque[bytes] = collections.deque()
        self._status_dirty = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._bad_logged: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None  # set when the bridge runs its own loop (async with)
        self._idle = asyncio.Event()  # clear while ``run`` executes, whoever owns its task
        self._idle.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> MqttBridge:
        self._task = asyncio.create_task(self.run(), name="mqtt")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Publish ``offline`` (when up) and disconnect cleanly, then ``run`` returns; safe to call
        twice. A loop that does not finish in ``CLOSE_TIMEOUT_S`` is left to its owner to cancel."""
        self._stop.set()
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("mqtt.close_timeout", link=self.link)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.link = "closed"

    def _client(self) -> aiomqtt.Client:
        s = self.section
        password = None
        if s.password_file:
            password = Path(os.path.expandvars(s.password_file)).expanduser().read_text().strip()
        tls_context = None
        if s.tls:
            ca = str(Path(os.path.expandvars(s.ca_file)).expanduser()) if s.ca_file else None
            tls_context = ssl.create_default_context(cafile=ca)
        return aiomqtt.Client(
            s.host, s.port, username=s.username or None, password=password, identifier=self.client_id,
            keepalive=s.keepalive_s, tls_context=tls_context, timeout=PUBLISH_TIMEOUT_S,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            logger=_paho_log,
            queue_type=cast(Any, lambda maxsize: _CountingQueue(self, maxsize)),
            max_queued_incoming_messages=INCOMING_QUEUE,
        )

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff until ``close``; never raises but cancellation."""
        self._idle.clear()
        try:
            await self._loop()
        finally:
            self._idle.set()
            self.link = "closed"

    async def _loop(self) -> None:
        attempt = 0
        client: aiomqtt.Client | None = None
        while not self._stop.is_set():
            self.link = "connecting"
            self.retry_at = None
            try:
                if client is None:
                    client = self._client()
                async with client:
                    self.link = "up"
                    self.connects += 1
                    attempt = 0
                    log.info("mqtt.connected", broker=f"{self.section.host}:{self.section.port}",
                             client_id=self.client_id, connects=self.connects)
                    await client.subscribe(f"{self.conditions_topic}/#", qos=1)
                    self._status_dirty = True  # the retained status may be the last will: replace it
                    self._wake.set()
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self._lost(str(exc) or type(exc).__name__, attempt)
            except (OSError, ssl.SSLError, ValueError) as exc:  # e.g. an unreadable password file, bad TLS
                self._lost(f"{type(exc).__name__}: {exc}", attempt)
            except Exception as exc:  # a bug here must cost the link, never the daemon
                log.exception("mqtt.unexpected_error")
                self._lost(f"{type(exc).__name__}: {exc}", attempt)
                client = None  # start over with a fresh client
            if self._stop.is_set():
                break
            delay = self.backoff(attempt)
            attempt += 1
            self.link = "down"
            self.retry_at = time.time() + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def backoff(self, attempt: int) -> float:
        """Capped exponential with full jitter in its upper half: many daemons restarted together
        do not hammer a recovering broker in step."""
        s = self.section
        ceiling = min(s.reconnect_max_s, s.reconnect_min_s * (2 ** min(attempt, 30)))
        return random.uniform(ceiling / 2, ceiling) if attempt else s.reconnect_min_s

    def _lost(self, error: str, attempt: int) -> None:
        self.last_error = error
        if self.link == "up":
            self.disconnects += 1
            log.warning("mqtt.disconnected", error=error, disconnects=self.disconnects)
        else:  # backoff keeps these to a few a minute once the broker has been away a while
            log.warning("mqtt.connect_failed", error=error, attempt=attempt + 1,
                        broker=f"{self.section.host}:{self.section.port}")

    async def _session(self, client: aiomqtt.Client) -> None:
        """Receive and send until the link drops (raises MqttError) or ``close`` (publishes offline)."""
        tasks = [asyncio.create_task(self._receive(client), name="mqtt.receive"),
                 asyncio.create_task(self._send(client), name="mqtt.send"),
                 asyncio.create_task(self._stop.wait(), name="mqtt.stop")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise cast(BaseException, t.exception())
        if self._stop.is_set():
            # A clean stop sends no will, so say it ourselves; the sender is stopped, so nothing
            # can overwrite it with an online status afterwards.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.status_topic, OFFLINE, qos=1, retain=True, timeout=CLOSE_TIMEOUT_S / 2)
            log.info("mqtt.closed", published=self.published, received=self.received)

    # -- incoming --------------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.handle(message.topic.value, message.payload)
        raise aiomqtt.MqttError("message stream ended")

    def handle(self, topic: str, payload: Any) -> bool:
        """One incoming message; True when its readings reached Soma. Never raises for bad input."""
        self.received += 1
        try:
            readings = parse_payload(topic, payload, self.section.topic_prefix, self.section.max_payload_bytes)
            self.on_readings(readings, "mqtt")
        except BadReading as exc:
            self._bad(exc.reason, exc.message, topic)
            return False
        self.accepted += 1
        self.readings += len(readings)
        return True

    def _bad(self, reason: str, message: str, topic: str) -> None:
        self.bad[reason] += 1
        now = time.monotonic()
        if now - self._bad_logged.get(reason, -BAD_LOG_INTERVAL_S) >= BAD_LOG_INTERVAL_S:
            self._bad_logged[reason] = now
            log.warning("mqtt.bad_payload", reason=reason, topic=topic, detail=message[:200], count=self.bad[reason])

    # -- outgoing --------------------------------------------------------------------------------
    def publish_speak(self, text: str, turn: int | None = None) -> None:
        """Queue a SPEAK for ``P/speak``; while the broker is away the oldest beyond ``offline_queue`` go."""
        if not text:
            return
        self._speak.append(text.encode("utf-8"))
        while len(self._speak) > max(self.section.offline_queue, 1 if self.link == "up" else 0):
            self._speak.popleft()
            self.speak_dropped += 1
        self._wake.set()

    def publish_status(self) -> None:
        """Mark the retained status stale; the sender publishes the newest one when it can."""
        self._status_dirty = True
        self._wake.set()

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._speak:
                await client.publish(self.speak_topic, self._speak[0], qos=1, timeout=PUBLISH_TIMEOUT_S)
                self._speak.popleft()  # only once the broker has it: a drop mid-publish sends it again
                self.published += 1
            if self._status_dirty:
                self._status_dirty = False
                payload = json.dumps(self.status_payload(), separators=(",", ":"), default=str)
                try:
                    await client.publish(self.status_topic, payload, qos=1, retain=True, timeout=PUBLISH_TIMEOUT_S)
                except BaseException:
                    self._status_dirty = True  # resend after the reconnect
                    raise
                self.published += 1

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "link": self.link,
            "broker": f"{self.section.host}:{self.section.port}",
            "client_id": self.client_id,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "last_error": self.last_error,
            "retry_in_s": round(max(0.0, self.retry_at - time.time()), 3) if self.retry_at is not None and self.link == "down" else None,
            "received": self.received,
            "accepted": self.accepted,
            "readings": self.readings,
            "bad_total": sum(self.bad.values()),
            "bad": dict(self.bad),
            "incoming_dropped": self.incoming_dropped,
            "published": self.published,
            "speak_queued": len(self._speak),
            "speak_dropped": self.speak_dropped,
        }


def parse_payload(topic: str, payload: Any, prefix: str, max_bytes: int) -> dict[str, float]:
    """``{name: value}`` from one message on ``<prefix>/conditions`` (a JSON object) or
    ``<prefix>/conditions/<name>`` (a bare number), or ``BadReading`` with a stable reason."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif isinstance(payload, int | float):  # aiomqtt passes bytes; other types would be a bug upstream
        payload = repr(payload).encode()
    elif payload is None:
        payload = b""
    if len(payload) > max_bytes:
        raise BadReading("oversized", f"{len(payload)} bytes; at most {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadReading("not_utf8", f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    base = f"{prefix.rstrip('/')}/conditions"
    if topic == base:
        return parse_readings(_json(text))
    sub = topic[len(base) + 1 :] if topic.startswith(base + "/") else ""
    if not sub or "/" in sub:
        raise BadReading("bad_topic", f"topic {topic!r}: readings go to {base} or {base}/<name>")
    name = check_name(sub)
    if not text.strip():
        raise BadReading("empty", f"empty payload for reading {name!r}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise BadReading("not_number", f"reading {name!r}: {text[:40]!r} is not a number") from None
    return {name: check_value(name, value)}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of too many digits, deep nesting
        raise BadReading("not_json", f"payload is not JSON: {str(exc)[:120]}") from None
