"""Soma: sensor readings ("conditions") become a felt state that paces the breath.

Deterministic, from configured ranges only (the model advises, it never sets thresholds):

- each reading ``name=value`` has a comfortable range ``[low, high]`` in ``[soma] ranges``; inside it
  its charge is 0; outside, ``0.5 + 0.5 * min(1, excess / (high - low))``, so any reading out of
  range is at least half-charged and one a whole range-width out is fully charged. A reading with
  no configured range is shown but never charged;
- the overall charge is the largest reading's; the label is ``urgent`` at ``urgent_charge`` and
  above, ``alert`` at ``alert_charge`` and above, else ``calm``;
- the breath: alert and urgent scale every phase by ``alert_breath_factor`` and
  ``urgent_breath_factor`` (faster breathing while something is wrong); calm and idle (no turn in
  the last breath) lengthens PAUSE by ``calm_pause_factor``.

Readings coalesce per name, latest wins: a burst of thousands becomes one felt state and at most
one SENSE observation per breath, so the inbox stays bounded whatever the sensors send.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentd.config import SomaSection
from models import transcript

LABELS = ("calm", "alert", "urgent")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
MAX_READINGS = 256  # distinct names Soma keeps; more is a sensor bug, refused rather than grown


class BadReading(ValueError):
    """A reading or a batch of readings that cannot be used; ``reason`` is a stable counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_readings(obj: Any) -> dict[str, float]:
    """Validate ``{name: number}`` (names ``[A-Za-z][A-Za-z0-9_.-]*``, finite numbers, not bools)."""
    if not isinstance(obj, dict):
        raise BadReading("not_object", f"readings must be an object of name -> number, got {type(obj).__name__}")
    if not obj:
        raise BadReading("empty", "no readings in the object")
    if len(obj) > MAX_READINGS:
        raise BadReading("too_many", f"{len(obj)} readings in one message; at most {MAX_READINGS}")
    out: dict[str, float] = {}
    for name, value in obj.items():
        out[check_name(name)] = check_value(name, value)
    return out


def check_name(name: Any) -> str:
    """``name`` when it is a usable reading name, else ``BadReading('bad_name')``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadReading("bad_name", f"reading name {name!r} must match {NAME_RE.pattern}")
    return name


def check_value(name: str, value: Any) -> float:
    """``value`` as a finite float; booleans, containers, strings, NaN and infinities are refused."""
    if isinstance(value, bool):
        raise BadReading("bool", f"reading {name!r} is a boolean; send a number")
    if isinstance(value, dict | list):
        raise BadReading("nested", f"reading {name!r} is a {type(value).__name__}; send a number")
    if not isinstance(value, int | float):
        raise BadReading("not_number", f"reading {name!r} is {type(value).__name__}, not a number")
    try:
        v = float(value)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        raise BadReading("inf", f"reading {name!r} is too large for a float") from None
    if math.isnan(v):
        raise BadReading("nan", f"reading {name!r} is NaN")
    if math.isinf(v):
        raise BadReading("inf", f"reading {name!r} is infinite")
    return v


@dataclass(frozen=True)
class Felt:
    """Soma's felt state: the label, the overall charge and each reading's value and charge."""

    label: str = "calm"
    charge: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    charges: dict[str, float] = field(default_factory=dict)

    def out_of_range(self) -> tuple[str, ...]:
        return tuple(sorted(n for n, c in self.charges.items() if c > 0))

    def to_dict(self) -> dict[str, Any]:
        """``label``, ``charge``, ``charges`` and ``values``: the felt state as the socket and MQTT show it."""
        return {"label": self.label, "charge": round(self.charge, 4),
                "charges": {n: round(c, 4) for n, c in self.charges.items()}, "values": dict(self.values)}


class Soma:
    def __init__(self, section: SomaSection) -> None:
        self.section = section
        self.felt = Felt()
        self.updates = 0
        self._shown: tuple[str, tuple[str, ...]] | None = None  # (label, out-of-range names) last shown

    def charge_of(self, name: str, value: float) -> float:
        """0 inside the comfortable range; 0.5..1 outside, growing with the distance."""
        r = self.section.ranges.get(name)
        if r is None:
            return 0.0
        low, high = float(r[0]), float(r[1])
        excess = low - value if value < low else value - high if value > high else 0.0
        if excess <= 0:
            return 0.0
        return 0.5 + 0.5 * min(1.0, excess / (high - low))

    def label_for(self, charge: float) -> str:
        s = self.section
        return "urgent" if charge >= s.urgent_charge else "alert" if charge >= s.alert_charge else "calm"

    def update(self, readings: Mapping[str, float]) -> Felt:
        """Merge ``readings`` (latest wins per name); the new felt state. Refuses growth past
        ``MAX_READINGS`` names."""
        old = self.felt
        new = [n for n in readings if n not in old.values]
        if len(old.values) + len(new) > MAX_READINGS:
            raise BadReading("too_many", f"Soma already tracks {len(old.values)} readings; at most {MAX_READINGS} names")
        # Only the new readings' charges are computed: a stream of one sensor costs O(1) per message.
        values = {**old.values, **readings}
        charges = {**old.charges, **{n: self.charge_of(n, v) for n, v in readings.items()}}
        charge = max(charges.values(), default=0.0)
        self.felt = Felt(self.label_for(charge), charge, values, charges)
        self.updates += 1
        return self.felt

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {n: (float(r[0]), float(r[1])) for n, r in self.section.ranges.items()}

    def observation_due(self) -> bool:
        """True when the label or the set of out-of-range readings changed since last shown: the model
        hears of changes that matter, not of every wobble of a sensor."""
        return self.felt.values != {} and self._shown != (self.felt.label, self.felt.out_of_range())

    def observation(self) -> str:
        """The SENSE observation text (as training renders it) of the felt state, marked as shown."""
        f = self.felt
        self._shown = (f.label, f.out_of_range())
        return transcript.sense_text(f.values, self.ranges(), f.label)

    def breath_factors(self, idle: bool) -> tuple[float, float]:
        """``(factor, pause_factor)`` for the BreathClock: every phase scales by ``factor``, PAUSE
        also by ``pause_factor`` (longer rests only when calm and nothing happened)."""
        s = self.section
        factor = {"urgent": s.urgent_breath_factor, "alert": s.alert_breath_factor}.get(self.felt.label, 1.0)
        pause = s.calm_pause_factor if self.felt.label == "calm" and idle else 1.0
        return factor, pause

    def status(self) -> dict[str, Any]:
        return {**self.felt.to_dict(), "updates": self.updates}
