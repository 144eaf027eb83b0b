"""Streaming generation: sample tokens from a backbone and turn them into agent segments.

A turn is a stream of segments opened by control tokens: THINK text, SPEAK text, EXEC code
END_EXEC, and WAIT (end of turn). ``Decoder.run`` yields ``Delta`` pieces as they are sampled
(so SPEAK can be streamed to users) and ``SegmentEnd`` when a segment closes, and returns a
``Stop`` telling why it stopped, with the state after the last consumed token. Text before any
control token is treated as THINK: unlabelled output is never spoken.

Every sampled token is fed back through ``backbone.step``, so the state always holds the whole
stream the model has seen and said. Sampling is seeded from (seed, state position), which makes a
restored state generate exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from models.base import Backbone, State

SegmentKind = Literal["think", "speak", "exec"]
StopReason = Literal["wait", "exec", "eos", "silence", "max_tokens", "cancelled"]
_OPENERS: dict[str, SegmentKind] = {"THINK": "think", "SPEAK": "speak", "EXEC": "exec"}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7  # 0 means greedy
    # Temperature inside EXEC code; None means ``temperature``. Code is decoded greedily by default
    # in the daemon: a sampled typo in a copied operand is a wrong RESULT, not a turn of phrase.
    exec_temperature: float | None = None
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    max_tokens: int = 512  # per call of Decoder.run
    silence_entropy: float | None = None  # nats; above it, a SPEAK about to start becomes silence
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.exec_temperature is not None and self.exec_temperature < 0:
            raise ValueError(f"exec_temperature must be >= 0, got {self.exec_temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Delta:
    """New text of the open segment."""

    kind: SegmentKind
    text: str


@dataclass(frozen=True)
class SegmentEnd:
    """A segment closed; ``text`` is all of it."""

    kind: SegmentKind
    text: str


@dataclass
class Stop:
    """Why generation stopped, the state after it, and the logits for the next token."""

    reason: StopReason
    state: State
    logits: Tensor  # [V]
    ids: list[int]  # the token ids sampled (and consumed) in this call


@dataclass(frozen=True)
class Notice:
    """Not model output: something clients should hear about while generation goes on (a remote
    backbone retrying after its server failed). ``Decoder`` never yields one; other decoders may."""

    code: str
    message: str
    data: dict[str, object]


Event = Delta | SegmentEnd | Notice


def entropy(logits: Tensor) -> float:
    """Shannon entropy (nats) of softmax(logits) over the last dim, for one distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


def sample(logits: Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """One token id from logits [V] under temperature / top-k / top-p."""
    logits = logits.float()
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < cfg.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def prefill(backbone: Backbone, state: State, tokens: Iterable[int], chunk: int = 512) -> tuple[Tensor | None, State]:
    """Feed ``tokens`` through the backbone in chunks; returns the last logits [V] (None if empty)."""
    ids = list(tokens)
    last: Tensor | None = None
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            t = torch.tensor([ids[i : i + chunk]], dtype=torch.long, device=backbone.device)
            logits, state = backbone.forward(t, state)
            last = logits[0, -1]
    return last, state


class Decoder:
    """Samples one stretch of a turn, up to WAIT, END_EXEC, EOS, silence, a cap or cancellation."""

    def __init__(self, backbone: Backbone, sampling: SamplingConfig | None = None) -> None:
        self.backbone = backbone
        self.sampling = sampling or SamplingConfig()

    def _rng(self, state: State) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.sampling.seed * 1_000_003 + state.meta.position) % (2**63))
        return g

    def run(
        self, state: State, logits: Tensor, cancel: threading.Event | None = None
    ) -> Generator[Event, None, Stop]:
        """Yield Delta/SegmentEnd events; return Stop. ``logits`` [V] predict the first token."""
        bb, cfg = self.backbone, self.sampling
        code_cfg = cfg if cfg.exec_temperature is None else replace(cfg, temperature=cfg.exec_temperature)
        tok = bb.tokenizer
        decoder = tok.stream_decoder()
        rng = self._rng(state)
        kind: SegmentKind | None = None
        parts: list[str] = []
        fresh_speak = False
        ids: list[int] = []

        def close() -> Generator[Event, None, None]:
            nonlocal kind, parts
            for p in decoder.flush():
                if p.text and kind is not None:
                    parts.append(p.text)
                    yield Delta(kind, p.text)
            if kind is not None:
                yield SegmentEnd(kind, "".join(parts))
            kind, parts = None, []

        with torch.inference_mode():
            while True:
                if cancel is not None and cancel.is_set():
                    yield from close()
                    return Stop("cancelled", state, logits, ids)
                if len(ids) >= cfg.max_tokens:
                    yield from close()
                    return Stop("max_tokens", state, logits, ids)
                if fresh_speak and cfg.silence_entropy is not None and entropy(logits) > cfg.silence_entropy:
                    # The model is unsure what to say: it says nothing (silence is an answer).
                    kind, parts = None, []
                    return Stop("silence", state, logits, ids)
                token_id = sample(logits, code_cfg if kind == "exec" else cfg, rng)
                step_logits, state = bb.step(torch.tensor([token_id], device=bb.device), state)
                logits = step_logits[0]
                ids.append(token_id)
                fresh_speak = False
                for piece in decoder.push(token_id):
                    if piece.control is None:
                        if kind is None:
                            kind = "think"
                        parts.append(piece.text)
                        yield Delta(kind, piece.text)
                        continue
                    c = piece.control
                    if c in _OPENERS:
                        yield from close()
                        kind = _OPENERS[c]
                        fresh_speak = kind == "speak"
                    elif c == "END_EXEC" and kind == "exec":
                        yield from close()
                        return Stop("exec", state, logits, ids)
                    elif c == "WAIT":
                        yield from close()
                        return Stop("wait", state, logits, ids)
                    elif c == "EOS":
                        yield from close()
                        return Stop("eos", state, logits, ids)
                    # Any other control (a stray delimiter) is consumed and ignored.


def decoder_for(backbone: Backbone, sampling: SamplingConfig | None = None) -> Decoder:
    """The decoder of ``backbone``: its own ``make_decoder(sampling)`` when it samples elsewhere (the
    ``remote`` backbone streams from a server), else a ``Decoder`` over its logits."""
    make = getattr(backbone, "make_decoder", None)
    return make(sampling or SamplingConfig()) if callable(make) else Decoder(backbone, sampling)


def collect(events: Generator[Event, None, Stop]) -> tuple[list[SegmentEnd], Stop]:
    """Drain a ``Decoder.run`` generator: the closed segments and the Stop."""
    segments: list[SegmentEnd] = []
    while True:
        try:
            ev = next(events)
        except StopIteration as done:
            return segments, done.value
        if isinstance(ev, SegmentEnd):
            segments.append(ev)

