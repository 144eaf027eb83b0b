"""Byte-level tokens plus agentd's control vocabulary.

Ids 0..255 are raw UTF-8 bytes; ids from 256 up are control tokens. Text given to ``encode`` is
always taken literally: a user who types ``<exec>`` gets bytes, never the EXEC token, so observed
text can never forge the model's own control stream.

Backbones whose vocabulary is text (``hf``, ``remote``) map the same controls to text tags
(``TAGS``) and parse them back with ``TagStreamParser``, both from ``models.texttags``.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from models.texttags import TAG_NAME, TAGS, Piece, TagStreamParser

__all__ = [
    "BYTE_VOCAB", "CLOSERS", "CONTROLS", "CONTROL_BASE", "DEFAULT", "ID", "NAME", "TAGS", "TAG_NAME", "VOCAB_SIZE",
    "ByteStreamDecoder", "ByteTokenizer", "Piece", "TagStreamParser",
]

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

# The text form of the controls (TAGS, TAG_NAME), Piece and TagStreamParser live in
# models.texttags, shared by the text-vocabulary backbones; re-exported here.


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


DEFAULT = ByteTokenizer()
