"""The BreathClock: INHALE (read the inbox) -> HOLD (recall) -> EXHALE (act) -> PAUSE (rest).

The clock only keeps time and announces phases; the agent loop does the work of each phase.
Durations come from ``[breath]`` and scale with ``factor`` (Soma: shorter when urgent) and
``pause_factor`` (longer rests when calm and idle). A chat message may cut a PAUSE short (``wake``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass

from agentd.config import BreathSection


class Phase(enum.StrEnum):
    INHALE = "inhale"
    HOLD = "hold"
    EXHALE = "exhale"
    PAUSE = "pause"


@dataclass
class ClockPosition:
    breath: int = 0
    phase: Phase = Phase.PAUSE


class BreathClock:
    def __init__(self, section: BreathSection, on_phase: Callable[[Phase, int], None] | None = None) -> None:
        self.section = section
        self.on_phase = on_phase
        self.position = ClockPosition()
        self.factor = 1.0
        self.pause_factor = 1.0
        self._wake = asyncio.Event()

    @property
    def phase(self) -> Phase:
        return self.position.phase

    @property
    def breath(self) -> int:
        return self.position.breath

    def duration(self, phase: Phase) -> float:
        base = {Phase.INHALE: self.section.inhale_s, Phase.HOLD: self.section.hold_s,
                Phase.EXHALE: self.section.exhale_s, Phase.PAUSE: self.section.pause_s}[phase]
        return base * self.factor * (self.pause_factor if phase is Phase.PAUSE else 1.0)

    def enter(self, phase: Phase) -> None:
        if phase is Phase.INHALE:
            self.position.breath += 1
        self.position.phase = phase
        if self.on_phase is not None:
            self.on_phase(phase, self.position.breath)

    async def hold_for(self, phase: Phase) -> None:
        """Stay in ``phase`` for its duration; PAUSE ends early on ``wake``."""
        d = self.duration(phase)
        if phase is Phase.PAUSE:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), d)
            self._wake.clear()
        elif d > 0:
            await asyncio.sleep(d)

    def wake(self) -> None:
        """Cut the current PAUSE short (a chat arrived, or the daemon is stopping)."""
        self._wake.set()

    def restore(self, breath: int) -> None:
        self.position.breath = breath
