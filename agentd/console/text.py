"""Making untrusted text safe to show, and the reconnect backoff.

Everything the console shows that came from the model (THINK, SPEAK, EXEC code and results) or from
a memory is untrusted: it may hold terminal escapes (``ESC [ 2 J`` clears the screen, ``ESC ] 52``
writes the clipboard), bidi overrides that reorder what a reader sees, or Textual markup such as
``[@click=app.quit]``. ``printable`` turns the first two into visible symbols; markup is never
parsed because the widgets are given ``Content`` built from plain text (never a markup ``str``).
"""

from __future__ import annotations

import random
import re

# C0 controls except newline and tab, DEL, and C1 controls (0x9b is a one-byte CSI on some terminals).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Bidirectional overrides and isolates: they make text read differently from what it is.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode control pictures: ESC shows as ␛, BEL as ␇
    if code == 0x7F:
        return "\u2421"  # ␡
    return f"\\x{code:02x}"


def printable(text: str) -> str:
    """``text`` with control characters and bidi overrides replaced by visible stand-ins.

    Newlines and tabs are kept; a carriage return becomes ␍ (it would overwrite the line)."""
    text = _CONTROL.sub(_visible, text)
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


class Backoff:
    """Capped exponential backoff with jitter for reconnecting to the daemon.

    The first retry comes after ``first`` seconds, each later one waits twice as long up to ``cap``;
    jitter (±``jitter`` of the delay) keeps many consoles from reconnecting in lockstep after a restart."""

    def __init__(self, first: float = 0.25, cap: float = 5.0, jitter: float = 0.2) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (and count that attempt)."""
        delay = min(self.cap, self.first * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        self.attempt = 0
