"""The event bus: the loop publishes, subscribers (socket clients, MQTT, memory) each get a bounded
queue. A subscriber that falls behind loses its oldest events, counted and logged, and never slows
the publisher: ``publish`` does not await."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("agentd.events")

Event = dict[str, Any]


class Subscription:
    """One subscriber's queue. ``dropped`` counts events lost to a full queue."""

    def __init__(self, bus: EventBus, maxsize: int, accept: Callable[[Event], bool] | None, name: str) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.accept = accept
        self.name = name
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.accept is not None and not self.accept(event):
            return
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest: the newest state matters more
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("subscriber_dropped_events", subscriber=self.name, dropped=self.dropped)
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, default_maxsize: int = 1024) -> None:
        self._subs: list[Subscription] = []
        self.default_maxsize = default_maxsize
        self.published = 0

    def subscribe(self, accept: Callable[[Event], bool] | None = None, maxsize: int | None = None, name: str = "") -> Subscription:
        sub = Subscription(self, maxsize or self.default_maxsize, accept, name)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber now (must be called on the event loop's thread)."""
        self.published += 1
        for sub in list(self._subs):
            sub.offer(event)

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self._subs)
