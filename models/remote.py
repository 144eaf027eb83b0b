"""``remote``: generation on an OpenAI-compatible server (vLLM, llama.cpp, Ollama, ``transformers serve``).

    [backbone]
    name = "remote"
    [backbone.options]
    base_url = "http://gpu-box:8000/v1"
    model = "Qwen/Qwen2.5-7B-Instruct"
    api_key_file = "/etc/agentd/remote.key"     # or api_key_env = "AGENTD_REMOTE_API_KEY"

agentd keeps running where it is (loop, memory, sandbox, senses) and sends generation out:

    state      the transcript window: the last ``window`` ids of agentd's byte+control stream
               (observations, the model's tagged replies, EXEC results), fixed size, persisted in
               snapshots like any backbone state and covered by ``state_digest``
    forward    appends ids to the window (there are no logits here: they come back as zeros)
    generate   ``RemoteDecoder``: the window becomes a request (a system prompt with the tag
               vocabulary, recalled memories and felt state; then the recent turns as messages),
               the streamed reply goes through ``models.texttags.TagStreamParser`` into the same
               Delta / SegmentEnd events as ``models.generate.Decoder``, and what the model said is
               appended to the window as control and byte ids
    failure    refused, slow, 429, 5xx or a stream cut mid-way: a ``Notice`` (an ``error`` event with
               ``fatal: false``), backoff, retry; after ``max_retries`` the turn fails with
               ``backbone_unavailable``. 400/401/403/404 are not retried: the config is wrong.

The HTTP side (streaming, timeouts, cancellation, health, the API key) is ``models.remote_http``.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
import torch
from torch import Tensor

from models.base import Backbone, State, StateMeta, register
from models.generate import Delta, Notice, SamplingConfig, SegmentEnd, SegmentKind, Stop
from models.remote_http import Health, Http, RemoteError, Retryable, public_url, read_api_key
from models.texttags import END_SPEAK, END_THINK, TAGS, Piece, TagStreamParser, escape
from models.tokenizer import ID, NAME, VOCAB_SIZE

__all__ = ["Remote", "RemoteConfig", "RemoteDecoder", "RemoteError", "Transcript", "read_transcript", "system_prompt"]

log = structlog.get_logger("models.remote")

_OPENERS: dict[str, SegmentKind] = {"THINK": "think", "SPEAK": "speak", "EXEC": "exec"}
_OBSERVATIONS = {"OBS": "END_OBS", "RESULT": "END_RESULT", "MEM": "END_MEM", "SENSE": "END_SENSE"}

SYSTEM_PROMPT = """You are the mind of agentd, a long-running agent. Everything you write is read by a program, so mark it with these tags:
<think> your private reasoning (never shown to the user)
<speak> words for the user
<exec> Python code to run in a sandbox </exec>  (its output comes back as <result>...</result>; then go on)
<wait/> when you are done for now: you sleep until the next input
A reply looks like: <think>...<speak>...<wait/>
Inputs: user messages come as they are, program results as <result>...</result>."""


@dataclass
class RemoteConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # the server's OpenAI API root (ends in /v1)
    model: str = ""  # the model name the server knows; "" sends none (a server pinned to one model)
    api: str = "chat"  # chat: /chat/completions with messages | completions: /completions with one prompt
    api_key_file: str = ""  # a file whose first line is the key (keep it mode 0600)
    api_key_env: str = "AGENTD_REMOTE_API_KEY"  # else this environment variable; neither: no key sent
    api_key: str = ""  # refused: a key never lives in config.toml
    window: int = 32768  # transcript bytes kept and sent (~4 bytes a token: the prompt's token budget)
    system_prompt: str = ""  # more instructions, appended to agentd's own system prompt
    untagged: str = "speak"  # what reply text before any tag is: speak (chat models answer plainly) | think
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # the longest silence within a response (a big prompt's prefill included)
    max_retries: int = 4  # attempts after the first, per generation stretch
    backoff_s: float = 0.5  # first retry delay; doubles each time, with jitter, up to backoff_max_s
    backoff_max_s: float = 20.0
    health_interval_s: float = 30.0  # status probes GET /models when the last contact is older
    # The protocol's fields: the stream is agentd's bytes + controls; there is no local network.
    vocab_size: int = VOCAB_SIZE
    d_model: int = 0
    n_layers: int = 0

    def __post_init__(self) -> None:
        if self.api_key:
            raise ValueError("api_key must not be written in the config: put the key in a file (api_key_file, "
                             "mode 0600) or an environment variable (api_key_env)")
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {self.api!r}")
        if self.untagged not in ("speak", "think"):
            raise ValueError(f"untagged must be 'speak' or 'think', got {self.untagged!r}")
        if self.window < 256:
            raise ValueError(f"window must be >= 256, got {self.window}")
        if self.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size is agentd's byte vocabulary ({VOCAB_SIZE}), got {self.vocab_size}")
        for name in ("connect_timeout_s", "read_timeout_s", "backoff_s", "backoff_max_s", "health_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


# -- the transcript ---------------------------------------------------------------------------------
@dataclass
class Transcript:
    """The window rendered for a request: context for the system prompt, then the turns."""

    memories: str = ""
    sense: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, text): user | assistant


def _bytes_text(buf: bytearray) -> str:
    return buf.decode("utf-8", errors="replace")


def read_transcript(ids: list[int], truncated: bool) -> Transcript:
    """Split a window of agentd ids into observations and the model's replies.

    OBS -> a user turn; RESULT -> a user turn ``<result>...</result>``; the latest MEM and SENSE go
    to the system prompt; everything else (THINK/SPEAK/EXEC text, WAIT) is the assistant's, with
    its controls written as tags. Observed text is escaped. A window cut at its start is read from
    the first turn boundary on, so no half observation is mistaken for a reply."""
    if truncated:
        cut = next((i for i, t in enumerate(ids) if t == ID["WAIT"]), None)
        if cut is None:
            cut = next((i for i, t in enumerate(ids) if NAME.get(t) in _OBSERVATIONS.values()), -1)
        ids = ids[cut + 1 :]
    tr = Transcript()
    span: str | None = None  # the observation being read
    buf = bytearray()
    reply: list[str] = []

    def add(role: str, text: str) -> None:
        if tr.turns and tr.turns[-1][0] == role:  # strict chat templates want roles to alternate
            tr.turns[-1] = (role, tr.turns[-1][1] + "\n\n" + text)
        else:
            tr.turns.append((role, text))

    def end_reply() -> None:
        if buf and span is None:
            reply.append(_bytes_text(buf))
            buf.clear()
        if reply and "".join(reply).strip():
            add("assistant", "".join(reply))
        reply.clear()

    for t in ids:
        if t < 256:
            buf.append(t)
            continue
        name = NAME.get(t, "PAD")
        if name in _OBSERVATIONS:
            end_reply()
            span, buf = name, bytearray()
        elif span is not None and name == _OBSERVATIONS[span]:
            text = escape(_bytes_text(buf))
            if span == "OBS":
                add("user", text)
            elif span == "RESULT":
                add("user", f"{TAGS['RESULT']}{text}{TAGS['END_RESULT']}")
            elif span == "MEM":
                tr.memories = text
            else:
                tr.sense = text
            span, buf = None, bytearray()
        elif span is None and name in TAGS:
            if buf:
                reply.append(_bytes_text(buf))
                buf.clear()
            reply.append(TAGS[name])
    if span is None:
        end_reply()
    while tr.turns and tr.turns[0][0] != "user":  # a conversation opens with the user
        tr.turns.pop(0)
    return tr


def system_prompt(tr: Transcript, extra: str = "") -> str:
    parts = [SYSTEM_PROMPT]
    if extra.strip():
        parts.append(extra.strip())
    if tr.memories.strip():
        parts.append("What you remember that may matter now:\n" + tr.memories.strip())
    if tr.sense.strip():
        parts.append("How you feel (from your sensors): " + tr.sense.strip())
    return "\n\n".join(parts)


# -- the backbone -----------------------------------------------------------------------------------
@register
class Remote(Backbone):
    name = "remote"
    Config = RemoteConfig

    def __init__(self, config: RemoteConfig) -> None:
        super().__init__(config)
        self.http = Http(config, read_api_key(config))
        self.health = Health()
        self.endpoint = public_url(config.base_url)
        self.source = f"{self.endpoint} ({config.model or 'server default'})"
        self._probe: threading.Thread | None = None

    @classmethod
    def check_config(cls, config: RemoteConfig) -> None:
        """What start-up checks before anything is touched: the API key file is readable."""
        read_api_key(config)

    @property
    def meta(self) -> StateMeta:
        # Only the window's layout decides whether a saved transcript fits: a new server, model,
        # key or timeout must not throw away the conversation.
        blob = json.dumps({"architecture": self.name, "window": self.config.window, "format": "transcript-1"})
        return StateMeta(self.name, hashlib.sha256(blob.encode()).hexdigest()[:16])

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        return {"tokens": torch.full((batch_size, self.config.window), ID["PAD"], dtype=torch.int32),
                "length": torch.zeros(batch_size, dtype=torch.long)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        W = self.config.window
        win, n = tensors["tokens"], int(tensors["length"][0])
        B, T = tokens.shape
        joined = torch.cat([win[:, :n], tokens.to(win.dtype).cpu()], dim=1)[:, -W:]
        m = joined.shape[1]
        win = torch.cat([joined, torch.full((B, W - m), ID["PAD"], dtype=win.dtype)], dim=1)
        # The server samples; locally there is no distribution, so the logits are uniform.
        logits = torch.zeros(B, T, self.config.vocab_size)
        return logits, {"tokens": win, "length": torch.full((B,), m, dtype=torch.long)}

    def transcript(self, state: State, row: int = 0) -> Transcript:
        n = int(state["length"][row])
        ids = state["tokens"][row, :n].tolist()
        # A full window has lost its start; position says whether anything was ever dropped.
        return read_transcript(ids, truncated=state.meta.position > n)

    def request_body(self, state: State, sampling: SamplingConfig) -> tuple[str, dict[str, Any]]:
        """The endpoint path and JSON body for generating after ``state``."""
        cfg = self.config
        tr = self.transcript(state)
        body: dict[str, Any] = {"stream": True, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature}
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        if cfg.model:
            body["model"] = cfg.model
        system = system_prompt(tr, cfg.system_prompt)
        if cfg.api == "chat":
            body["messages"] = [{"role": "system", "content": system}] + [{"role": r, "content": t} for r, t in tr.turns]
            return "/chat/completions", body
        lines = [system, ""]
        for role, text in tr.turns:
            lines.append(f"{TAGS['OBS']}{text}{TAGS['END_OBS']}" if role == "user" else text)
        body["prompt"] = "\n".join(lines)
        return "/completions", body

    def make_decoder(self, sampling: SamplingConfig) -> RemoteDecoder:
        return RemoteDecoder(self, sampling)

    # -- status -----------------------------------------------------------------------------------
    def probe(self) -> bool:
        """GET /models: is the server there? Updates ``health``."""
        try:
            self.http.get_json("/models", timeout=min(5.0, self.config.read_timeout_s))
        except Retryable as exc:
            self.health.failed(str(exc), down=True)
            log.warning("remote_probe_failed", endpoint=self.endpoint, error=str(exc))
            return False
        self.health.ok()
        return True

    def status_section(self) -> dict[str, Any]:
        """For the daemon's ``status``: endpoint and health. Never blocks: when the last contact is
        older than ``health_interval_s`` a probe starts in the background for the next status."""
        stale = time.time() - self.health.last_contact() > self.config.health_interval_s
        if stale and (self._probe is None or not self._probe.is_alive()):
            self._probe = threading.Thread(target=self.probe, name="remote-probe", daemon=True)
            self._probe.start()
        return {"endpoint": self.endpoint, "model": self.config.model, "api": self.config.api,
                **self.health.snapshot()}


class RemoteDecoder:
    """``models.generate.Decoder``'s contract, with the sampling done by the server."""

    def __init__(self, backbone: Remote, sampling: SamplingConfig) -> None:
        self.backbone = backbone
        self.sampling = sampling

    def run(self, state: State, logits: Tensor, cancel: threading.Event | None = None
            ) -> Generator[Delta | SegmentEnd | Notice, None, Stop]:
        bb, cfg = self.backbone, self.backbone.config
        all_ids: list[int] = []
        attempt = 0
        while True:
            if cancel is not None and cancel.is_set():
                return Stop("cancelled", state, logits[-1] if logits.dim() > 1 else logits, all_ids)
            path, body = bb.request_body(state, self.sampling)
            reply = _Reply(cfg.untagged)
            bb.health.requests += 1
            t0 = time.monotonic()
            log.info("remote_request", endpoint=bb.endpoint, path=path, attempt=attempt, turns_sent=len(body.get("messages", [])))
            try:
                for line in bb.http.stream(path, body, cancel):
                    if reply.first_byte is None:
                        reply.first_byte = time.monotonic() - t0
                    yield from reply.line(line)
                    if reply.stop is not None or (cancel is not None and cancel.is_set()):
                        break
                reason = reply.stop or ("cancelled" if cancel is not None and cancel.is_set() else reply.finish)
                if reason is None:
                    raise Retryable("stream ended before the reply did (no finish_reason, no [DONE])")
            except Retryable as exc:
                yield from reply.close()
                all_ids += reply.ids
                state = _advance(bb, state, reply.ids)
                attempt += 1
                down = attempt > cfg.max_retries
                bb.health.failed(str(exc), down=down)
                if down:
                    log.error("remote_failed", endpoint=bb.endpoint, attempts=attempt, error=str(exc))
                    raise RemoteError(f"remote backbone {bb.endpoint} failed {attempt} times; last: {exc}") from exc
                delay = exc.retry_after if exc.retry_after is not None else min(
                    cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                bb.health.retries += 1
                log.warning("remote_retry", endpoint=bb.endpoint, attempt=attempt, delay_s=round(delay, 2), error=str(exc))
                yield Notice("backbone_retry", f"remote backbone {bb.endpoint}: {exc}; retry {attempt}/{cfg.max_retries} "
                             f"in {delay:.1f}s", {"attempt": attempt, "retry_in_s": round(delay, 2), "endpoint": bb.endpoint})
                if cancel is not None and cancel.wait(delay):
                    return Stop("cancelled", state, torch.zeros(cfg.vocab_size), all_ids)
                if cancel is None:
                    time.sleep(delay)
                continue
            except RemoteError as exc:
                bb.health.failed(str(exc), down=True)
                log.error("remote_refused", endpoint=bb.endpoint, error=str(exc))
                raise
            yield from reply.close()
            bb.health.ok(reply.first_byte)
            if reply.malformed or reply.unclosed_exec:
                yield Notice("backbone_malformed", reply.complaint(bb.endpoint),
                             {"malformed_chunks": reply.malformed, "unclosed_exec": reply.unclosed_exec,
                              "endpoint": bb.endpoint})
            all_ids += reply.ids
            state = _advance(bb, state, reply.ids)
            log.info("remote_reply", endpoint=bb.endpoint, reason=reason, ids=len(reply.ids),
                     seconds=round(time.monotonic() - t0, 3))
            return Stop(reason, state, torch.zeros(cfg.vocab_size), all_ids)  # type: ignore[arg-type]


def _advance(bb: Remote, state: State, ids: list[int]) -> State:
    if not ids:
        return state
    _, state = bb.forward(torch.tensor([ids], dtype=torch.long), state)
    return state


class _Reply:
    """One streamed response: SSE lines -> tag pieces -> Delta/SegmentEnd events and agentd ids."""

    def __init__(self, untagged: str) -> None:
        self.untagged: SegmentKind = "speak" if untagged == "speak" else "think"
        self.parser = TagStreamParser()
        self.kind: SegmentKind | None = None
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.stop: str | None = None  # wait | exec | eos, once the reply says so
        self.finish: str | None = None  # from the server: eos (stop) | max_tokens (length)
        self.first_byte: float | None = None
        self.malformed = 0  # stream lines that were not the JSON chunks they should be
        self.unclosed_exec = False  # the reply ended inside <exec>: its code is not run
        self._reasoning = False

    def complaint(self, endpoint: str) -> str:
        what = []
        if self.malformed:
            what.append(f"{self.malformed} malformed stream chunk(s) skipped")
        if self.unclosed_exec:
            what.append("the reply ended inside <exec> without </exec>, so its code was not run")
        return f"remote backbone {endpoint}: " + "; ".join(what)

    def line(self, raw: bytes) -> Generator[Delta | SegmentEnd, None, None]:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text.startswith("data:"):
            return  # SSE comments, event names, blank separators
        data = text[5:].strip()
        if data == "[DONE]":
            self.finish = self.finish or "eos"
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.malformed += 1
            log.warning("remote_malformed_chunk", chunk=data[:200])
            return
        if not isinstance(chunk, dict):
            self.malformed += 1
            log.warning("remote_malformed_chunk", chunk=data[:200])
            return
        if "error" in chunk:  # servers report a failure mid-stream this way
            raise Retryable(f"server error mid-stream: {str(chunk['error'])[:300]}")
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(reasoning, str) and reasoning:
                if not self._reasoning:
                    self._reasoning = True
                    yield from self._pieces([Piece(control="THINK")])
                yield from self._pieces([Piece(text=reasoning)])
            if isinstance(content, str) and content:
                if self._reasoning:  # a server that splits out reasoning: its answer is plain text
                    self._reasoning = False
                    yield from self._pieces([Piece(control=END_THINK)])
                yield from self._pieces(self.parser.push(content))
            if choice.get("finish_reason"):
                self.finish = "max_tokens" if choice["finish_reason"] == "length" else "eos"
            if self.stop is not None:
                return

    def close(self) -> Generator[Delta | SegmentEnd, None, None]:
        if self.stop is None:
            yield from self._pieces(self.parser.flush())
            self.unclosed_exec = self.kind == "exec"
        yield from self._end()

    def _end(self) -> Generator[SegmentEnd, None, None]:
        if self.kind is not None:
            yield SegmentEnd(self.kind, "".join(self.parts))
        self.kind, self.parts = None, []

    def _pieces(self, pieces: list[Piece]) -> Generator[Delta | SegmentEnd, None, None]:
        for p in pieces:
            if self.stop is not None:
                return  # after WAIT / END_EXEC / an observation tag the reply is over
            if p.control is None:
                if self.kind is None:
                    self.kind = self.untagged
                    self.ids.append(ID[self.untagged.upper()])
                self.parts.append(p.text)
                self.ids += p.text.encode("utf-8")
                yield Delta(self.kind, p.text)
                continue
            c = p.control
            if c in _OPENERS:
                yield from self._end()
                self.kind = _OPENERS[c]
                self.ids.append(ID[c])
            elif c in (END_THINK, END_SPEAK):
                yield from self._end()  # text after it is untagged again
            elif c == "END_EXEC" and self.kind == "exec":
                self.ids.append(ID[c])
                yield from self._end()
                self.stop = "exec"
            elif c == "WAIT":
                self.ids.append(ID[c])
                yield from self._end()
                self.stop = "wait"
            elif c in _OBSERVATIONS or c == "EOS":
                # The model writes an observation of its own: it is impersonating the user or a
                # program. Its turn is over; what follows is not kept.
                yield from self._end()
                self.stop = "eos"
