"""The backbone protocol around the architectures: tokenizer, tag parser, state files, checkpoints,
and the streaming Decoder driven by a backbone whose logits are scripted."""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import models
from models.generate import Decoder, Delta, SamplingConfig, SegmentEnd, Stop, collect, prefill
from models.texttags import parse_chunks
from models.tokenizer import BYTE_VOCAB, DEFAULT, ID, VOCAB_SIZE, Piece, TagStreamParser

TINY = dict(d_model=32, n_layers=2, filter_len=16, window=8, n_heads=2, attn_every=2, mem_every=1, mem_slots=4)


# -- tokenizer --------------------------------------------------------------------------------------
def _random_texts(n: int) -> list[str]:
    rng = random.Random(0)
    texts = ["", "hello", "<exec>print(1)</exec>", "<speak>", "é漢字🙂\x00\n\t", "\ufffd"]
    for _ in range(n):
        # Any code point but surrogates (which no UTF-8 string can hold).
        cps = [rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]) for _ in range(rng.randrange(1, 40))]
        texts.append("".join(map(chr, cps)))
        # Strings derived from arbitrary bytes, as a corrupted observation would arrive.
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).decode("utf-8", errors="replace"))
    return texts


@pytest.mark.parametrize("text", _random_texts(100))
def test_tokenizer_round_trips_utf8_and_never_yields_controls(text: str) -> None:
    ids = DEFAULT.encode(text)
    assert all(0 <= i < BYTE_VOCAB for i in ids)
    assert not any(DEFAULT.is_control(i) for i in ids)
    assert DEFAULT.decode(ids) == text
    stream = DEFAULT.stream_decoder()
    pieces = [p for i in ids for p in stream.push(i)] + stream.flush()
    assert all(p.control is None for p in pieces)
    assert "".join(p.text for p in pieces) == text


def test_tokenizer_controls() -> None:
    assert VOCAB_SIZE == DEFAULT.vocab_size == 272
    ids = DEFAULT.wrap("OBS", "hi")
    assert ids == [ID["OBS"], ord("h"), ord("i"), ID["END_OBS"]]
    assert DEFAULT.decode(ids) == "<obs>hi</obs>"
    assert DEFAULT.decode(ids, controls=False) == "hi"
    stream = DEFAULT.stream_decoder()
    # A control in the middle of a multi-byte character flushes the partial bytes first.
    pieces = [p for i in [0xC3, ID["SPEAK"], *"é".encode()] for p in stream.push(i)]
    assert pieces == [Piece(text="\ufffd"), Piece(control="SPEAK"), Piece(text="é")]
    assert stream.push(ID["PAD"]) == []


# -- tag stream parser ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "chunks, expected",
    [
        (["<sp", "eak>hel", "lo<wait/>"], [Piece(control="SPEAK"), Piece(text="hello"), Piece(control="WAIT")]),
        (["<", "/", "exec", ">"], [Piece(control="END_EXEC")]),
        (["< Speak >x</ EXEC >"], [Piece(control="SPEAK"), Piece(text="x"), Piece(control="END_EXEC")]),
        (["<WAIT>"], [Piece(control="WAIT")]),
        (["hi <speak"], [Piece(text="hi <speak")]),  # unclosed at the end: text
        (["a < b and c > d"], [Piece(text="a < b and c > d")]),
        (["<b>bold</b>"], [Piece(text="<b>bold</b>")]),  # unknown tags pass through
        (["<" + "x" * 40, "> y"], [Piece(text="<" + "x" * 40 + "> y")]),  # too long to be a tag
        # Fences around a tag are dropped when they arrive in the same chunk as the tag.
        (["```<exec>```\n", "print(1)\n", "```</exec>```"], [Piece(control="EXEC"), Piece(text="print(1)\n"), Piece(control="END_EXEC")]),
        (["`<wait/>`"], [Piece(control="WAIT")]),
        (["x = `a`"], [Piece(text="x = `a`")]),  # backticks away from tags are kept
    ],
)
def test_tag_stream_parser(chunks: list[str], expected: list[Piece]) -> None:
    assert parse_chunks(chunks) == expected


def test_tag_stream_parser_holds_back_a_partial_tag() -> None:
    p = TagStreamParser()
    assert p.push("hello <spe") == [Piece(text="hello ")]
    assert p.push("ak>") == [Piece(control="SPEAK")]


# -- state files ------------------------------------------------------------------------------------
def test_state_files_round_trip_and_refuse_other_configs(tmp_path: Path) -> None:
    bb = models.build("hyena", **TINY)
    other = models.build("hyena", **{**TINY, "n_layers": 3})
    with torch.no_grad():
        _, state = bb.forward(torch.tensor([[1, 2, 3]]), bb.init_state())
    models.save_state(state, tmp_path / "s")
    loaded = models.load_state(tmp_path / "s", bb)
    assert models.state_digest(loaded) == models.state_digest(state) and loaded.meta.position == 3
    with pytest.raises(models.StateError, match="another config"):
        models.load_state(tmp_path / "s", other)
    with pytest.raises(models.StateError, match="another config"):
        other.step(torch.tensor([1]), state)
    with pytest.raises(models.StateError):
        models.load_state(tmp_path / "missing", bb)
    (tmp_path / "g").write_bytes(b"garbage")
    with pytest.raises(models.StateError):
        models.load_state(tmp_path / "g", bb)


def test_state_digest_is_stable_and_sensitive() -> None:
    bb = models.build("hyena", **TINY)
    state = bb.init_state()
    assert len({models.state_digest(state) for _ in range(10)}) == 1
    changed = state.clone()
    changed["h0.long"][0, 0, 0, 0] = 1e-30
    assert models.state_digest(changed) != models.state_digest(state)


@pytest.mark.parametrize("arch", ["nexus", "spiral", "astarte", "agiformer", "hyena"])
def test_a_state_is_compact_and_digestible_after_a_chunk(arch: str) -> None:
    # Their forwards leave last-position slices of the chunk's temporaries in the state: nexus's
    # lex.rsum and spiral's breath.phase are size-1 views that ``state_digest`` once refused
    # (the daemon's status op failed), astarte's abpe.R held a 1.1 MiB buffer.
    torch.manual_seed(0)
    bb = models.build(arch).eval()
    with torch.inference_mode():
        _, state = bb.forward(torch.randint(0, 256, (1, 300)), bb.init_state())
    for name, t in state.items():
        assert t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size(), name
    digest = models.state_digest(state)
    assert digest == models.state_digest(state.clone()) and len(digest) == 64


def test_state_digest_reads_a_strided_size_one_view() -> None:
    bb = models.build("spiral")
    state = bb.init_state()
    assert state["breath.phase"].shape == (1,)
    strided = state.clone()
    strided["breath.phase"] = torch.cat([state["breath.phase"], torch.ones(6, dtype=state["breath.phase"].dtype)])[None, :][:, 0]  # stride 7
    assert strided["breath.phase"].stride() == (7,)
    assert models.state_digest(strided) == models.state_digest(state)


# -- checkpoints ------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    bb = models.build("hyena", **TINY)
    models.save_checkpoint(bb, tmp_path, step=12, extra={"note": "x"})
    meta = models.read_checkpoint_meta(tmp_path)
    assert meta["architecture"] == "hyena" and meta["step"] == 12 and meta["note"] == "x"
    loaded = models.load_checkpoint(tmp_path, expect="hyena")
    assert loaded.config == bb.config
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(bb.forward(tokens, bb.init_state())[0], loaded.forward(tokens, loaded.init_state())[0])


@pytest.mark.parametrize("damage", ["missing_dir", "missing_weights", "garbage_weights", "garbage_config", "other_arch", "truncated"])
def test_bad_checkpoint(tmp_path: Path, damage: str) -> None:
    bb = models.build("hyena", **TINY)
    models.save_checkpoint(bb, tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    expect = "hyena"
    if damage == "missing_dir":
        target = tmp_path / "nowhere"
    else:
        target = tmp_path
        if damage == "missing_weights":
            weights.unlink()
        elif damage == "garbage_weights":
            weights.write_bytes(b"\x00" * 100)
        elif damage == "garbage_config":
            config.write_text("[1, 2")
        elif damage == "other_arch":
            expect = "nexus"
        elif damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(models.CheckpointError):
        models.load_checkpoint(target, expect=expect)


def test_checkpoint_of_another_architecture_in_config(tmp_path: Path) -> None:
    bb = models.build("hyena", **TINY)
    models.save_checkpoint(bb, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "architecture": "no-such-arch"}))
    with pytest.raises(models.CheckpointError, match="unknown backbone"):
        models.load_checkpoint(tmp_path)


# -- decoder ----------------------------------------------------------------------------------------
@dataclass
class ScriptedConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 1
    n_layers: int = 1


class Scripted(models.Backbone):
    """Test-only backbone: after consuming the token at position p its logits pick ``script[p + 1]``
    (``script[0]`` is what ``first_logits`` picks). ``None`` in the script gives uniform logits."""

    name = "scripted-test"
    Config = ScriptedConfig

    def __init__(self, script: list[int | None]) -> None:
        super().__init__(ScriptedConfig())
        self.script = script
        self.weight = nn.Parameter(torch.zeros(1))  # pins the device
        self.seen: list[int] = []

    def logits_at(self, i: int) -> Tensor:
        out = torch.zeros(VOCAB_SIZE)
        tok = self.script[i] if i < len(self.script) else self.script[-1]
        if tok is not None:
            out[tok] = 50.0
        return out

    def first_logits(self) -> Tensor:
        return self.logits_at(0)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        return {"count": torch.zeros(batch_size, 1)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        self.seen += tokens[0].tolist()
        logits = torch.stack([self.logits_at(pos + i + 1) for i in range(tokens.shape[1])])[None]
        return logits.expand(tokens.shape[0], -1, -1), {"count": tensors["count"] + tokens.shape[1]}


def _ids(*parts: str | int) -> list[int | None]:
    out: list[int | None] = []
    for p in parts:
        out += DEFAULT.encode(p) if isinstance(p, str) else [p]
    return out


def _run(script: list[int | None], cancel: threading.Event | None = None, **sampling: float | int | None) -> tuple[list[Delta | SegmentEnd], Stop, Scripted]:
    bb = Scripted(script)
    dec = Decoder(bb, SamplingConfig(temperature=0.0, **sampling))  # type: ignore[arg-type]
    gen = dec.run(bb.init_state(), bb.first_logits(), cancel)
    events: list[Delta | SegmentEnd] = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value, bb


def test_decoder_think_speak_wait() -> None:
    script = _ids(ID["THINK"], "hmm", ID["SPEAK"], "hé!", ID["WAIT"], "never")
    events, stop, bb = _run(script)
    ends = [e for e in events if isinstance(e, SegmentEnd)]
    assert ends == [SegmentEnd("think", "hmm"), SegmentEnd("speak", "hé!")]
    assert "".join(e.text for e in events if isinstance(e, Delta) and e.kind == "speak") == "hé!"
    assert stop.reason == "wait"
    assert len(stop.ids) == len(script) - len("never") == bb.seen.__len__()
    assert stop.state.meta.position == len(stop.ids)
    assert int(stop.logits.argmax()) == ord("n")  # logits for what follows WAIT


def test_decoder_untagged_text_is_thought_and_exec_stops() -> None:
    events, stop, _ = _run(_ids("plan", ID["EXEC"], "print(1)", ID["END_EXEC"], "x"))
    assert [e for e in events if isinstance(e, SegmentEnd)] == [SegmentEnd("think", "plan"), SegmentEnd("exec", "print(1)")]
    assert stop.reason == "exec"


def test_decoder_eos_and_stray_controls() -> None:
    segments, stop = collect(Decoder(bb := Scripted(_ids(ID["SPEAK"], "a", ID["END_OBS"], "b", ID["EOS"])), SamplingConfig(temperature=0.0)).run(bb.init_state(), bb.first_logits()))
    assert segments == [SegmentEnd("speak", "ab")]
    assert stop.reason == "eos"


def test_decoder_max_tokens() -> None:
    events, stop, _ = _run(_ids(ID["SPEAK"], "a" * 50), max_tokens=6)
    assert stop.reason == "max_tokens" and len(stop.ids) == 6
    assert [e for e in events if isinstance(e, SegmentEnd)] == [SegmentEnd("speak", "aaaaa")]


def test_decoder_cancel() -> None:
    cancel = threading.Event()
    bb = Scripted(_ids(ID["SPEAK"], "a" * 50))
    gen = Decoder(bb, SamplingConfig(temperature=0.0)).run(bb.init_state(), bb.first_logits(), cancel)
    texts = []
    for ev in gen:
        if isinstance(ev, Delta):
            texts.append(ev.text)
            if len(texts) == 3:
                cancel.set()
    # The segment is closed with what was said, and no token is sampled after the cancel.
    assert texts == ["a", "a", "a"]
    assert len(bb.seen) == 4


def test_decoder_silence_when_unsure_what_to_say() -> None:
    events, stop, _ = _run(_ids(ID["SPEAK"]) + [None] + _ids("x"), silence_entropy=1.0)
    assert stop.reason == "silence" and len(stop.ids) == 1
    assert not any(isinstance(e, Delta) and e.kind == "speak" for e in events)
    # Confident speech is not silenced, and without a threshold nothing is.
    _, stop, _ = _run(_ids(ID["SPEAK"], "ok", ID["WAIT"]), silence_entropy=1.0)
    assert stop.reason == "wait"
    _, stop, _ = _run(_ids(ID["SPEAK"]) + [None, ID["WAIT"]], max_tokens=3)
    assert stop.reason != "silence"


def test_prefill_feeds_everything_in_chunks() -> None:
    bb = Scripted(_ids("abc"))
    last, state = prefill(bb, bb.init_state(), list(range(10)), chunk=4)
    assert bb.seen == list(range(10)) and state.meta.position == 10
    assert last is not None and last.shape == (VOCAB_SIZE,)
    assert prefill(bb, state, [])[0] is None


def test_decoder_with_hyena_resumes_identically_from_a_saved_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bb = models.build("hyena", **TINY)
    last, state = prefill(bb, bb.init_state(), DEFAULT.wrap("OBS", "hello there"), chunk=5)
    assert last is not None
    models.save_state(state, tmp_path / "s")
    dec = Decoder(bb, SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_tokens=40, seed=3))
    a_segments, a_stop = collect(dec.run(state, last))
    b_segments, b_stop = collect(dec.run(models.load_state(tmp_path / "s", bb), last))
    assert a_segments == b_segments and a_stop.reason == b_stop.reason and len(a_stop.ids) == len(b_stop.ids)
    assert models.state_digest(a_stop.state) == models.state_digest(b_stop.state)
    assert a_stop.state.meta.position == state.meta.position + len(a_stop.ids)


class _Torn(Scripted):
    """Scripted, but where the script says ``-1`` "x" and "y" are near-tied (x ahead by 0.1)."""

    def logits_at(self, i: int) -> Tensor:
        if (self.script[i] if i < len(self.script) else self.script[-1]) != -1:
            return super().logits_at(i)
        out = torch.zeros(VOCAB_SIZE)
        out[DEFAULT.encode("x")[0]], out[DEFAULT.encode("y")[0]] = 20.0, 19.9
        return out


def test_decoder_takes_exec_code_at_its_own_temperature() -> None:
    script = _ids(ID["SPEAK"]) + [-1] * 12 + _ids(ID["EXEC"]) + [-1] * 12 + _ids(ID["END_EXEC"])
    sampled = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=5)
    for exec_temperature, code in ((None, None), (0.0, "x" * 12)):
        bb = _Torn(script)  # type: ignore[arg-type]
        segments, stop = collect(Decoder(bb, replace(sampled, exec_temperature=exec_temperature)).run(bb.init_state(), bb.first_logits()))
        speak, exec_ = segments[0].text, segments[1].text
        assert stop.reason == "exec" and len(speak) == len(exec_) == 12
        assert "y" in speak  # prose is still sampled: the near-tie goes both ways
        if code is None:
            assert "y" in exec_  # without its own temperature, code is sampled like prose
        else:
            assert exec_ == code  # greedy: the better token every time
    with pytest.raises(ValueError, match="exec_temperature"):
        SamplingConfig(exec_temperature=-0.5)
