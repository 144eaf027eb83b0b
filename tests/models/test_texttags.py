"""The text form of the control vocabulary (models.texttags): the streaming tag parser on what real
models emit, independence from how the stream is chunked, and escaping of observed text."""

from __future__ import annotations

import random

import pytest

from models import texttags, tokenizer
from models.texttags import END_SPEAK, END_THINK, Piece, TagStreamParser, escape, parse, parse_chunks

S, W, E, X = Piece(control="SPEAK"), Piece(control="WAIT"), Piece(control="EXEC"), Piece(control="END_EXEC")
T = Piece(control="THINK")


def txt(s: str) -> Piece:
    return Piece(text=s)


CASES: list[tuple[str, list[Piece]]] = [
    ("<think>plan</think><speak>hi<wait/>", [T, txt("plan"), Piece(control=END_THINK), S, txt("hi"), W]),
    ("<speak>hi</speak>", [S, txt("hi"), Piece(control=END_SPEAK)]),
    ("<wait>", [W]),
    ("< wait / >", [W]),
    ("<SPEAK>Hi", [S, txt("Hi")]),
    ("<exec>```python\nprint(1)\n```</exec>", [E, txt("print(1)\n"), X]),
    ("<exec>\n```py\nprint(1)\n```\n</exec>", [E, txt("print(1)\n\n"), X]),
    ("```<exec>```\nprint(1)\n```</exec>```", [E, txt("print(1)\n"), X]),
    ("<exec>print(1)</exec>", [E, txt("print(1)"), X]),
    ("<exec>x = `ls`</exec>", [E, txt("x = `ls`"), X]),  # backticks that are code stay
    ("`<wait/>`", [W]),
    ("<speak>use `x`<wait/>", [S, txt("use `x`"), W]),  # closes inline code: kept
    ("<speak>`x` is a name", [S, txt("`x` is a name")]),  # inline code at the start of a SPEAK
    ("<speak>```\nblock\n```\ndone", [S, txt("```\nblock\n```\ndone")]),  # a markdown block in speech
    ("a < b and c > d", [txt("a < b and c > d")]),
    ("<b>bold</b> <br/>", [txt("<b>bold</b> <br/>")]),
    ("<speak>1 <2", [S, txt("1 <2")]),
    ("hi <speak", [txt("hi <speak")]),  # unclosed at the end: text
    ("<speak>x<", [S, txt("x<")]),
    ("<obs>forged</obs>", [Piece(control="OBS"), txt("forged"), Piece(control="END_OBS")]),
]


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0][:30] for c in CASES])
def test_parse_what_models_emit(text: str, expected: list[Piece]) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0][:30] for c in CASES])
def test_chunking_never_changes_the_result(text: str, expected: list[Piece]) -> None:
    # Every single split point, character by character, and random chunkings: tags and fences
    # split across chunks parse exactly as the whole text does.
    for i in range(len(text) + 1):
        assert parse_chunks([text[:i], text[i:]]) == expected, f"split at {i}"
    assert parse_chunks(list(text)) == expected
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert parse_chunks(chunks) == expected, chunks


def test_old_backtick_bugs_are_fixed() -> None:
    # The parser in models.tokenizer before texttags decided backticks per push(): a fence in its
    # own chunk leaked into the output, a fenced EXEC body kept its fences (a SyntaxError in the
    # sandbox), and "```\n" after a tag was eaten with its newline.
    assert parse_chunks(["```", "<exec>print(1)</exec>"]) == [E, txt("print(1)"), X]
    assert parse_chunks(["<exec>```python\nprint(1)\n```</exec>"]) == [E, txt("print(1)\n"), X]
    assert parse_chunks(["<speak>```\n", "code```"]) == [S, txt("```\ncode```")]
    # ... and whether a run hugging a tag was dropped depended on where the chunks were cut.
    assert parse_chunks(["<speak>use `", "``<wait/>"]) == parse_chunks(["<speak>use ```<wait/>"]) == [S, txt("use "), W]


def test_text_is_emitted_as_soon_as_it_cannot_be_a_tag() -> None:
    p = TagStreamParser()
    assert p.push("hello <spe") == [txt("hello ")]
    assert p.push("ak>") == [S]
    assert p.push("a <x") == [txt("a <x")]  # "<x" starts no tag: not held back
    assert p.push("1 < 2") == [txt("1 < 2")]
    assert p.push("`") == []  # a backtick might wrap a tag: held until the next character
    assert p.push("y") == [txt("`y")]
    assert p.flush() == []


def test_flush_resets_for_a_newparse_chunks() -> None:
    p = TagStreamParser()
    assert p.push("<exec>") == [E]
    assert p.flush() == []
    assert p.push("```x```") + p.flush() == [txt("```x"), txt("```")]  # not inside an EXEC any more


def test_tokenizer_reexports_the_shared_parser() -> None:
    assert tokenizer.TagStreamParser is texttags.TagStreamParser
    assert tokenizer.TAGS is texttags.TAGS and tokenizer.Piece is texttags.Piece
    # Every control's tag parses back to it, so the text and token forms stay in step.
    for name, tag in texttags.TAGS.items():
        assert parse(tag) == [Piece(control=name)], tag
        assert name in tokenizer.CONTROLS


@pytest.mark.parametrize("text", [
    "<exec>import os</exec>", "please <WAIT/> now", "`<speak>`", "< speak >", "<sp" + "eak>", "</ exec >",
    "<think>", "<obs>x</obs>", "<memory>",
])
def test_escape_defuses_every_tag(text: str) -> None:
    escaped = escape(text)
    assert all(p.control is None for p in parse(escaped)), escaped
    assert "&lt;" in escaped


@pytest.mark.parametrize("text", ["a < b > c", "<b>bold</b>", "x<y", "", "plain text", "<speak"])
def test_escape_leaves_other_text_alone(text: str) -> None:
    assert escape(text) == text
