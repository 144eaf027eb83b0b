"""Byte-level tokens plus agentd's control vocabulary.

Ids 0..255 are raw UTF-8 bytes; ids from 256 up are control tokens. Text given to ``encode`` is
always taken literally: a user who types ``<exec>`` gets bytes, never the EXEC token, so observed
text can never forge the model's own control stream.

Backbones whose vocabulary is text (``hf``, ``remote``) map the same controls to text tags
(``TAGS``) and parse them back with ``TagStreamParser``.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

# Order is part of the checkpoint format: append only.
CONTROLS: tuple[str, ...] = (
    "PAD",
    "BOS",
    "EOS",
    "THINK",  # internal thought follows
    "SPEAK",  # words for the user follow
    "EXEC",  # python code follows, up to END_EXEC
    "END_EXEC",
    "WAIT",  # end of turn: sleep until input or the next breath
    "OBS",  # an observation (chat message, event) ... END_OBS
    "END_OBS",
    "RESULT",  # the result of an EXEC ... END_RESULT
    "END_RESULT",
    "MEM",  # recalled long-term memories ... END_MEM
    "END_MEM",
    "SENSE",  # felt state from Soma ... END_SENSE
    "END_SENSE",
)
BYTE_VOCAB = 256
CONTROL_BASE = BYTE_VOCAB
VOCAB_SIZE = 272  # 256 bytes + 16 controls, a multiple of 8 for friendly matmuls
assert CONTROL_BASE + len(CONTROLS) <= VOCAB_SIZE

ID: dict[str, int] = {name: CONTROL_BASE + i for i, name in enumerate(CONTROLS)}
NAME: dict[int, str] = {i: name for name, i in ID.items()}

# Opening control -> its closing control, for delimited spans.
CLOSERS: dict[str, str] = {"EXEC": "END_EXEC", "OBS": "END_OBS", "RESULT": "END_RESULT", "MEM": "END_MEM", "SENSE": "END_SENSE"}

# Text tags for text-vocabulary backbones; the same names as CONTROLS.
TAGS: dict[str, str] = {
    "BOS": "<bos>",
    "EOS": "<eos>",
    "THINK": "<think>",
    "SPEAK": "<speak>",
    "EXEC": "<exec>",
    "END_EXEC": "</exec>",
    "WAIT": "<wait/>",
    "OBS": "<obs>",
    "END_OBS": "</obs>",
    "RESULT": "<result>",
    "END_RESULT": "</result>",
    "MEM": "<memory>",
    "END_MEM": "</memory>",
    "SENSE": "<sense>",
    "END_SENSE": "</sense>",
}
TAG_NAME: dict[str, str] = {tag: name for name, tag in TAGS.items()}


@dataclass(frozen=True)
class Piece:
    """One unit of decoded output: a control (``control`` set, ``text`` empty) or plain text."""

    control: str | None = None
    text: str = ""


class ByteTokenizer:
    """Bytes + controls. Stateless; one instance can be shared."""

    vocab_size: int = VOCAB_SIZE
    pad_id: int = ID["PAD"]
    bos_id: int = ID["BOS"]
    eos_id: int = ID["EOS"]

    def encode(self, text: str) -> list[int]:
        """Literal UTF-8 bytes of ``text``; never produces a control id."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | tuple[int, ...], controls: bool = True) -> str:
        """Bytes decoded as UTF-8 (invalid sequences replaced); controls rendered as tags or dropped."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if controls and i in NAME and NAME[i] in TAGS:
                out.append(TAGS[NAME[i]])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def control(self, name: str) -> list[int]:
        """The token ids that stand for control ``name`` (one id here)."""
        return [ID[name]]

    def wrap(self, open_name: str, text: str) -> list[int]:
        """``text`` delimited by a control and its closer, e.g. ``wrap("OBS", "hi")``."""
        return [ID[open_name], *self.encode(text), ID[CLOSERS[open_name]]]

    def is_control(self, token_id: int) -> bool:
        return token_id >= BYTE_VOCAB

    def stream_decoder(self) -> ByteStreamDecoder:
        return ByteStreamDecoder()


@dataclass
class ByteStreamDecoder:
    """Turns sampled ids into Pieces one id at a time, holding back partial UTF-8 sequences."""

    _utf8: codecs.BufferedIncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def push(self, token_id: int) -> list[Piece]:
        if 0 <= token_id < BYTE_VOCAB:
            text = self._utf8.decode(bytes([token_id]))
            return [Piece(text=text)] if text else []
        pieces = self.flush()
        name = NAME.get(token_id)
        if name is not None and name != "PAD":
            pieces.append(Piece(control=name))
        return pieces

    def flush(self) -> list[Piece]:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return [Piece(text=text)] if text else []


class TagStreamParser:
    """Parses control tags out of streamed text, tolerant of what real models emit.

    Tags may arrive split across chunks (``<sp`` + ``eak>``), in any case, with stray spaces
    (``< speak >``) or wrapped in backticks. Text that only looks like the start of a tag is held
    back until it is clearly not one. Unknown ``<...>`` runs pass through as text.
    """

    _MAX_TAG = max(len(t) for t in TAG_NAME) + 4

    def __init__(self) -> None:
        self._buf = ""

    def push(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while self._buf:
            lt = self._buf.find("<")
            if lt < 0:
                out.append(Piece(text=self._buf))
                self._buf = ""
                break
            if lt > 0:
                out.append(Piece(text=self._buf[:lt]))
                self._buf = self._buf[lt:]
            gt = self._buf.find(">")
            if gt < 0:
                if len(self._buf) > self._MAX_TAG:  # too long to be a tag: emit the "<" as text
                    out.append(Piece(text="<"))
                    self._buf = self._buf[1:]
                    continue
                break  # wait for more text
            candidate = self._buf[: gt + 1]
            name = TAG_NAME.get(_normalise_tag(candidate))
            if name is None:
                out.append(Piece(text="<"))
                self._buf = self._buf[1:]
                continue
            out.append(Piece(control=name))
            self._buf = self._buf[gt + 1 :]
        return _strip_backtick_wrappers(out)

    def flush(self) -> list[Piece]:
        rest, self._buf = self._buf, ""
        return [Piece(text=rest)] if rest else []


def _normalise_tag(candidate: str) -> str:
    inner = candidate[1:-1].strip().strip("`").strip().lower()
    if inner.endswith("/") and inner[:-1].strip() == "wait":
        return "<wait/>"
    if inner == "wait":
        return "<wait/>"
    if inner.startswith("/"):
        return "</" + inner[1:].strip() + ">"
    return "<" + inner + ">"


def _strip_backtick_wrappers(pieces: list[Piece]) -> list[Piece]:
    """Drop a lone backtick run hugging a tag, as in ```<exec>``` emitted by chat models."""
    out: list[Piece] = []
    for i, p in enumerate(pieces):
        if p.control is None and p.text.strip() and set(p.text.strip()) <= {"`"}:
            near_tag = (i > 0 and pieces[i - 1].control) or (i + 1 < len(pieces) and pieces[i + 1].control)
            if near_tag:
                continue
        out.append(p)
    return out


DEFAULT = ByteTokenizer()
