"""How observations are written into the model's stream: one place, used by the daemon's loop and
by the training data, so that what a model is trained on is exactly what it is served.

Every observation is a delimited span of byte tokens (see ``models.tokenizer``):
  OBS    a chat message                     OBS hello END_OBS
  MEM    recalled long-term memories         MEM - fact one\\n- fact two END_MEM
  SENSE  felt state from Soma                SENSE temperature=71.0 high; felt: urgent END_SENSE
  RESULT the result of an EXEC               RESULT 391 END_RESULT
Backbones with their own text vocabulary get the same spans through their tokenizer's ``wrap``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class _Wrapper(Protocol):
    def wrap(self, open_name: str, text: str) -> list[int]: ...


def _tok(tokenizer: _Wrapper | None) -> _Wrapper:
    if tokenizer is not None:
        return tokenizer
    from models.tokenizer import DEFAULT

    return DEFAULT


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, with a visible marker when cut."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    marker = f" [...{len(data) - max_bytes} bytes cut]"
    return data[: max(0, max_bytes - len(marker))].decode("utf-8", errors="ignore") + marker


def chat_text(text: str) -> str:
    return text.strip()


def memory_text(memories: Sequence[str]) -> str:
    return "\n".join(f"- {m.strip()}" for m in memories)


def reading_status(value: float, low: float, high: float) -> str:
    return "low" if value < low else "high" if value > high else "ok"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"


def sense_text(values: Mapping[str, float], ranges: Mapping[str, tuple[float, float]], felt: str | None = None) -> str:
    """``name=value status`` per reading (status from its comfortable range), then the felt label."""
    parts = []
    for name in sorted(values):
        v = values[name]
        status = reading_status(v, *ranges[name]) if name in ranges else "ok"
        parts.append(f"{name}={_num(v)} {status}")
    if felt is None:
        felt = "alert" if any(p.endswith((" high", " low")) for p in parts) else "calm"
    return "; ".join(parts) + f"; felt: {felt}"


def exec_result_text(stdout: str, stderr: str = "", exit_code: int = 0, timed_out: bool = False, limit: str | None = None) -> str:
    """What the model reads back after an EXEC: stdout, then any failure in one short line."""
    out = stdout.rstrip("\n")
    notes = []
    if timed_out:
        notes.append("error: timed out")
    elif limit:
        notes.append(f"error: {limit} limit hit")
    elif exit_code != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {exit_code}"
        notes.append(f"error: {last}")
    return "\n".join([p for p in (out, *notes) if p]) or "(no output)"


def chat_tokens(text: str, tokenizer: _Wrapper | None = None) -> list[int]:
    return _tok(tokenizer).wrap("OBS", chat_text(text))


def memory_tokens(memories: Sequence[str], tokenizer: _Wrapper | None = None) -> list[int]:
    return _tok(tokenizer).wrap("MEM", memory_text(memories))


def sense_tokens(values: Mapping[str, float], ranges: Mapping[str, tuple[float, float]], felt: str | None = None,
                 tokenizer: _Wrapper | None = None) -> list[int]:
    return _tok(tokenizer).wrap("SENSE", sense_text(values, ranges, felt))


def exec_result_tokens(stdout: str, stderr: str = "", exit_code: int = 0, timed_out: bool = False, limit: str | None = None,
                       tokenizer: _Wrapper | None = None) -> list[int]:
    return _tok(tokenizer).wrap("RESULT", exec_result_text(stdout, stderr, exit_code, timed_out, limit))
