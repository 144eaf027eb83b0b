"""The pure parts of the console: making text safe to show, the reconnect backoff, readings."""

from __future__ import annotations

import pytest

from agentd.console.screens import parse_readings
from agentd.console.text import Backoff, printable


def test_printable_makes_every_control_character_visible_and_keeps_the_rest() -> None:
    assert printable("plain [b]markup[/b] stays\n\ttabbed") == "plain [b]markup[/b] stays\n\ttabbed"
    assert printable("\x1b[2J\x1b]52;c;Zm9v\x07") == "␛[2J␛]52;c;Zm9v␇"
    assert printable("over\rwrite\x00\x7f") == "over␍write␀␡"
    assert printable("csi\x9b31m") == "csi\\x9b31m"  # a one-byte CSI (C1) on some terminals
    assert printable("abc\u202edef\u2066") == "abc<U+202E>def<U+2066>"
    for code in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]:
        assert chr(code) not in printable(f"a{chr(code)}b"), hex(code)
    assert printable("héllo ✓ 日本") == "héllo ✓ 日本"


def test_backoff_doubles_to_its_cap_with_bounded_jitter_and_resets() -> None:
    b = Backoff(first=0.5, cap=4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5
    j = Backoff(first=1.0, cap=1.0, jitter=0.2)
    delays = [j.next() for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays) and len(set(delays)) > 1
    with pytest.raises(ValueError, match="first"):
        Backoff(first=2.0, cap=1.0)


def test_parse_readings_accepts_names_and_numbers_and_names_the_bad_part() -> None:
    assert parse_readings("temperature=71.5 latency=12, voltage=-3e-1") == {
        "temperature": 71.5, "latency": 12.0, "voltage": -0.3}
    with pytest.raises(ValueError, match="'hot' is not NAME=VALUE"):
        parse_readings("hot")
    with pytest.raises(ValueError, match="'warm' is not a number"):
        parse_readings("temperature=warm")
    with pytest.raises(ValueError, match="no readings"):
        parse_readings("  ")
