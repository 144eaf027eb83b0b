"""The text form of agentd's control vocabulary, for backbones whose vocabulary is text.

Byte-level backbones have a control *token* for THINK, SPEAK, EXEC ... (``models.tokenizer``).
Backbones that speak text (``hf``: a transformers LM; ``remote``: an OpenAI-compatible server)
carry the same controls as text tags, mapped here once for both:

    THINK <think>   SPEAK <speak>   EXEC <exec> ... </exec>   WAIT <wait/>
    OBS <obs> ... </obs>   RESULT <result> ... </result>   MEM <memory> ... </memory>
    SENSE <sense> ... </sense>   BOS <bos>   EOS <eos>

``TagStreamParser`` reads them back out of streamed model text. Real models are sloppy, so it
accepts what they emit: tags split across chunks (``<sp`` + ``eak>``), any case, stray spaces
(``< speak >``), ``<wait>`` for ``<wait/>``, closers we do not use (``</think>``, ``</speak>``,
reported as END_THINK / END_SPEAK), tags hugged by markdown backticks (``` ```<exec>``` ```), a
markdown fence around the code of an EXEC, and unclosed tags at the end (kept as text).

``escape`` makes observed text safe to put into a transcript that this parser will read, so that
a user who types ``<exec>`` can never forge a control.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["END_THINK", "END_SPEAK", "TAGS", "TAG_NAME", "Piece", "TagStreamParser", "escape", "parse"]

# Text tags for the controls; the names are those of ``models.tokenizer.CONTROLS``.
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

# Closers that chat models emit by habit (reasoning models close <think>); they end the segment.
END_THINK = "END_THINK"
END_SPEAK = "END_SPEAK"

# Tag bodies (between < and >, lower case, spaces and backticks removed) -> control name.
_INNER: dict[str, str] = {tag[1:-1]: name for tag, name in TAG_NAME.items()}
_INNER.update({"wait": "WAIT", "/wait": "WAIT", "/think": END_THINK, "/speak": END_SPEAK})
_MAX_TAG = max(len(k) for k in _INNER) + 8  # room for stray spaces and backticks inside the brackets
_BLANK = " \t"
_TEXT_OPENERS = ("THINK", "SPEAK", "OBS", "RESULT", "MEM", "SENSE")  # text follows them


@dataclass(frozen=True)
class Piece:
    """One unit of decoded output: a control (``control`` set, ``text`` empty) or plain text."""

    control: str | None = None
    text: str = ""


def _squash(inner: str) -> str:
    return "".join(c for c in inner if c not in " \t`").lower()


_NEED = object()  # the buffer ends before it can be decided: wait for more text


def _match_tag(buf: str, final: bool) -> tuple[str, int] | None | object:
    """At ``buf[0] == "<"``: (control name, length) for a tag, None when it is not one, or _NEED."""
    gt = buf.find(">", 1, _MAX_TAG + 1)
    body = buf[1:gt] if gt >= 0 else buf[1 : _MAX_TAG + 1]
    if "<" in body or "\n" in body:
        return None
    squashed = _squash(body)
    if gt >= 0:
        name = _INNER.get(squashed)
        return (name, gt + 1) if name is not None else None
    # No ">" yet: a prefix of some tag may still become one; anything else is text right away,
    # so that ``a < b`` is not held back waiting for a ">".
    if final or len(buf) > _MAX_TAG or not any(k.startswith(squashed) for k in _INNER):
        return None
    return _NEED


class TagStreamParser:
    """Streamed model text in, ``Piece``s out; text is emitted as soon as it cannot start a tag.

    Backticks are dropped only where they wrap a tag: a run that starts a line (or follows blank
    space or a tag) and is followed by a tag, or a run right after a tag and followed by blank
    space or the end. Inline code (``x = `a```) is kept, including at the start of a SPEAK. Inside
    an EXEC, a leading blank line and a markdown fence line (```` ```python ````) are dropped, and so
    is a closing fence right before ``</exec>``: the code that runs is the code, not its markdown.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._prev = "start"  # what came last: start | tag | blank | char
        self._in_exec = False
        self._exec_fresh = False  # inside EXEC with nothing but blank lines and a fence so far
        self._last_tag = ""

    def push(self, text: str) -> list[Piece]:
        self._buf += text
        return self._scan(final=False)

    def flush(self) -> list[Piece]:
        """End of stream: everything held back is decided (an unclosed tag is text)."""
        out = self._scan(final=True)
        self.__init__()  # type: ignore[misc]  # ready for a new stream
        return out

    # -- the scanner -----------------------------------------------------------------------
    def _text(self, out: list[Piece], text: str) -> None:
        if not text:
            return
        if out and out[-1].control is None:
            out[-1] = Piece(text=out[-1].text + text)
        else:
            out.append(Piece(text=text))
        self._prev = "blank" if text[-1] in _BLANK + "\r\n" else "char"
        self._exec_fresh = False

    def _control(self, out: list[Piece], name: str) -> None:
        out.append(Piece(control=name))
        self._prev = "tag"
        self._last_tag = name
        self._in_exec = name == "EXEC"
        self._exec_fresh = self._in_exec

    def _scan(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buf:
            b = self._buf
            if self._exec_fresh:
                n = self._exec_prologue(b, final)
                if n is _NEED:
                    break
                if isinstance(n, int) and n > 0:
                    self._buf = b[n:]
                    continue
                self._exec_fresh = False
            i = min((j for j in (b.find("<"), b.find("`")) if j >= 0), default=-1)
            if i < 0:
                self._text(out, b)
                self._buf = ""
                break
            if i > 0:
                self._text(out, b[:i])
                self._buf = b[i:]
                continue
            if b[0] == "<":
                m = _match_tag(b, final)
                if m is _NEED:
                    break
                if m is None:
                    self._text(out, "<")
                    self._buf = b[1:]
                    continue
                name, n = m  # type: ignore[misc]
                self._control(out, name)
                self._buf = b[n:]
                continue
            drop = self._backticks(b, final)
            if drop is _NEED:
                break
            run = len(b) - len(b.lstrip("`"))
            if drop:
                self._buf = b[run:]
                if self._prev != "tag":
                    self._prev = "blank"  # the wrapper is gone: what follows starts afresh
            else:
                self._text(out, b[:run])
                self._buf = b[run:]
        return out

    def _backticks(self, b: str, final: bool) -> bool | object:
        """At a run of backticks: True to drop it as a wrapper of a tag, False to keep it as text."""
        run = len(b) - len(b.lstrip("`"))
        rest = b[run:]
        gap = rest.lstrip(_BLANK + ("\r\n" if self._in_exec else ""))
        if not gap and not final:
            return _NEED  # the run, or the blank space after it, may go on
        if gap.startswith("<"):
            m = _match_tag(gap, final)
            if m is _NEED:
                return _NEED
            if m is not None and self._prev in ("start", "tag", "blank"):
                return True  # ```<exec>  or  `<wait/>`  or  ```\n</exec>
        if self._prev == "tag" and not gap:
            return True  # <wait/>`  at the end
        if self._prev == "tag" and self._last_tag not in _TEXT_OPENERS and (gap[0] in "\r\n" or len(gap) < len(rest)):
            return True  # </exec>```\n: a fence closing around a tag. After <speak> it opens a markdown block.
        return False

    def _exec_prologue(self, b: str, final: bool) -> int | None | object:
        """Inside a fresh EXEC: how many leading chars to drop (blank lines, a fence line)."""
        stripped = b.lstrip("\r\n")
        if stripped != b:
            return len(b) - len(stripped)
        if not b.startswith("`"):
            return None if b.strip(_BLANK) or final else _NEED
        if len(b) < 3 and not final and b == "`" * len(b):
            return _NEED
        if not b.startswith("```"):
            return None
        nl = b.find("\n")
        if nl < 0:
            if final:
                return len(b) if b[3:].strip(_BLANK).isidentifier() or not b[3:].strip() else None
            return _NEED if len(b) < 40 else None
        lang = b[3:nl].strip()
        if lang and not all(c.isalnum() or c in "+-._" for c in lang):
            return None
        return nl + 1


def parse(text: str) -> list[Piece]:
    """All pieces of a complete text (adjacent text pieces merged)."""
    return parse_chunks([text])


def parse_chunks(chunks: Iterable[str]) -> list[Piece]:
    """All pieces of a text that arrived in ``chunks`` (as from a stream), adjacent text pieces
    merged: the same list however the text was split."""
    p = TagStreamParser()
    pieces = [x for c in chunks for x in p.push(c)] + p.flush()
    out: list[Piece] = []
    for piece in pieces:
        if piece.control is None and out and out[-1].control is None:
            out[-1] = Piece(text=out[-1].text + piece.text)
        else:
            out.append(piece)
    return out


def escape(text: str) -> str:
    """``text`` with every tag the parser would read defused (its ``<`` written ``&lt;``), so
    observed text (a chat message, a program's output) can never forge a control."""
    out: list[str] = []
    i = 0
    while True:
        j = text.find("<", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        out.append("&lt;" if _match_tag(text[j:], final=True) is not None else "<")
        i = j + 1
