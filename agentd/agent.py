"""The agent loop: observe -> THINK -> SPEAK -> EXEC -> WAIT, paced by the BreathClock.

Each breath:
  INHALE  drain the inbox (chat messages, anything queued) and ask the senses (Soma) for news
  HOLD    recall: the observation queries long-term memory (when there is one)
  EXHALE  one turn: feed MEM + observations, generate segments; an EXEC runs in the sandbox and
          its RESULT is fed back before generation goes on; the turn ends at WAIT (or a guard)
  PAUSE   rest: snapshot the neural state, compact memory; no input is read

All torch work runs in a worker thread; generated pieces come back to the event loop with
``call_soon_threadsafe``, so the loop never blocks and ``status`` always answers. A turn always
ends with a WAIT token in the model's stream, whatever stopped it, so the stream stays well formed.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import torch
from torch import Tensor

from agentd.breath import BreathClock, Phase
from agentd.config import Config
from agentd.events import EventBus
from models import transcript
from models.base import Backbone, State
from models.generate import Delta, Notice, SamplingConfig, SegmentEnd, Stop, decoder_for, prefill

log = structlog.get_logger("agentd.agent")

Listener = Callable[[dict[str, Any]], None]


@dataclass
class Observation:
    """Something the agent perceives. ``tokens`` (pre-rendered) wins over ``kind``/``text``."""

    kind: str  # chat | condition (Soma's SENSE) | event
    text: str
    source: str = "client"
    tokens: list[int] | None = None
    listener: Listener | None = None  # gets this turn's events (a chat request's connection)
    done: asyncio.Future[dict[str, Any]] | None = None  # resolved with the turn's result
    remember: bool = True


@dataclass
class TurnResult:
    turn: int
    speak: str = ""
    reason: str = "wait"
    segments: int = 0
    execs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)


class TurnError(Exception):
    """A turn that failed (its backbone did): what a chat request's ``done`` future raises, so the
    requester gets one terminal ``error`` event with ``code`` instead of a ``done``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Memory(Protocol):
    """What the loop needs of long-term memory and snapshots (agentd.memory_service.MemoryService)."""

    @property
    def enabled(self) -> bool: ...
    def remember(self, kind: str, text: str, source: str = "agent", meta: dict[str, Any] | None = None) -> None: ...
    async def recall_tokens(self, text: str, tokenizer: Any) -> list[int]: ...
    async def pause(self, state: State, context: list[int], clock: dict[str, Any]) -> None: ...


class Executor(Protocol):
    """What the loop needs of the sandbox (sandbox.service.SandboxService)."""

    async def execute(self, code: str, turn: int = 0, exec_id: str | None = None) -> Any: ...


class Agent:
    def __init__(self, config: Config, backbone: Backbone, bus: EventBus, clock: BreathClock,
                 state: State | None = None, context: list[int] | None = None) -> None:
        self.config = config
        self.backbone = backbone
        self.bus = bus
        self.clock = clock
        self.state: State = state if state is not None else backbone.init_state(1)
        self.context: collections.deque[int] = collections.deque(context or [], maxlen=config.agent.context_tokens)
        self.memory: Memory | None = None
        self.executor: Executor | None = None
        self.on_pause: list[Callable[[], Any]] = []  # extra PAUSE work (awaited if it returns an awaitable)
        self.senses: list[Callable[[], Observation | None]] = []  # asked at INHALE for a coalesced observation
        self.turns = 0
        self.inbox: collections.deque[Observation] = collections.deque()
        self._inbox_event = asyncio.Event()
        self._cancel = threading.Event()
        self._listeners: list[Listener] = []
        self._stopping = False
        self.in_turn = False
        self._snapshot_position = self.state.meta.position
        b = config.backbone
        self.decoder = decoder_for(backbone, SamplingConfig(
            temperature=b.temperature, exec_temperature=b.exec_temperature, top_k=b.top_k, top_p=b.top_p,
            max_tokens=b.max_tokens, silence_entropy=b.silence_entropy or None, seed=b.seed))

    def restore(self, state: State, context: list[int], clock: dict[str, Any]) -> None:
        """Resume from a snapshot: the model's state, its recent context and the clock's count."""
        self.backbone.check_state(state)
        self.state = state
        self.context.clear()
        self.context.extend(context)
        self.turns = int(clock.get("turns", 0))
        self.clock.restore(int(clock.get("breath", 0)))
        self._snapshot_position = state.meta.position

    # -- input ---------------------------------------------------------------------------------
    def put(self, obs: Observation) -> None:
        """Queue an observation for the next INHALE; a chat wakes a resting clock and, during a
        turn, interrupts it (the new message is answered next)."""
        self.inbox.append(obs)
        self._inbox_event.set()
        if obs.kind == "chat":
            if self.config.breath.wake_on_chat:
                self.clock.wake()
            if self.in_turn and self.config.agent.interrupt_on_chat:
                self._cancel.set()

    def cancel(self) -> bool:
        """Interrupt the turn being generated; False when no turn runs."""
        if self.in_turn:
            self._cancel.set()
            return True
        return False

    def stop(self) -> None:
        """Finish the current turn, then leave ``run`` (no new input is read)."""
        self._stopping = True
        self.clock.wake()

    # -- events --------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        """Publish on the bus and to the requesters of the current turn."""
        self.bus.publish(event)
        for listener in self._listeners:
            listener(event)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            self.clock.enter(Phase.INHALE)
            await self.clock.hold_for(Phase.INHALE)
            batch = [obs for sense in self.senses if (obs := sense()) is not None]
            batch += self.inbox
            self.inbox.clear()
            self.clock.enter(Phase.HOLD)
            recalled = await self._recall(batch) if batch else []
            await self.clock.hold_for(Phase.HOLD)
            self.clock.enter(Phase.EXHALE)
            if batch:
                await self.run_turn(batch, recalled)
            await self.clock.hold_for(Phase.EXHALE)
            if self._stopping:
                break
            self.clock.enter(Phase.PAUSE)
            await self._pause()
            if not self.inbox and not self._stopping:
                await self.clock.hold_for(Phase.PAUSE)

    async def _recall(self, batch: list[Observation]) -> list[int]:
        if self.memory is None or not self.memory.enabled:
            return []
        query = " ".join(o.text for o in batch if o.kind == "chat" and o.text)
        if not query:
            return []
        return await self.memory.recall_tokens(query, self.backbone.tokenizer)

    async def _pause(self) -> None:
        # Snapshot only what changed: an idle agent breathing for months must not rewrite
        # (and fsync) the same state every few seconds.
        if self.memory is not None and self.state.meta.position != self._snapshot_position:
            await self.memory.pause(self.state, list(self.context), self.clock_dict())
            self._snapshot_position = self.state.meta.position
        for hook in self.on_pause:
            try:
                res = hook()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:  # a part's rest work failing must not stop the breath
                log.exception("pause_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))

    def clock_dict(self) -> dict[str, Any]:
        return {"breath": self.clock.breath, "turns": self.turns}

    # -- one turn ------------------------------------------------------------------------------
    def _render(self, obs: Observation) -> list[int]:
        if obs.tokens is not None:
            return obs.tokens
        text = transcript.clip(obs.text, self.config.agent.observation_max_bytes)
        return self.backbone.tokenizer.wrap("OBS", transcript.chat_text(text))

    async def run_turn(self, batch: list[Observation], recalled: list[int] | None = None) -> TurnResult:
        """Feed ``recalled`` memories and the observations, then generate until the turn ends."""
        self.turns += 1
        res = TurnResult(turn=self.turns)
        t0 = time.perf_counter()
        self._listeners = [o.listener for o in batch if o.listener is not None]
        self._cancel.clear()
        self.in_turn = True
        agent_cfg = self.config.agent
        failure: TurnError | None = None
        try:
            tokens = list(recalled or [])
            for obs in batch:
                tokens += self._render(obs)
                if self.memory is not None and obs.remember and obs.text:
                    self.memory.remember(obs.kind, obs.text, source=obs.source)
            logits = await self._feed(tokens)
            seen_code: collections.Counter[str] = collections.Counter()
            speak: list[str] = []
            while True:
                stop = await self._generate(logits, res, speak)
                logits = stop.logits
                if stop.reason != "exec":
                    res.reason = stop.reason
                    break
                code = res.events[-1]["code"] if res.events and res.events[-1]["event"] == "exec" else ""
                seen_code[code] += 1
                res.execs += 1
                if res.execs > agent_cfg.max_execs_per_turn or seen_code[code] >= agent_cfg.max_repeat_exec + 1:
                    res.reason = "guard"
                    log.warning("turn_guard", turn=res.turn, execs=res.execs, repeated=seen_code[code])
                    break
                logits = await self._feed(await self._execute(code, res))
                if res.segments >= agent_cfg.max_segments_per_turn:
                    res.reason = "guard"
                    break
            if stop.reason not in ("wait",):
                await self._feed(self.backbone.tokenizer.control("WAIT"))  # close the turn in the stream
            res.speak = "".join(speak)
            if speak and self.memory is not None:
                self.memory.remember("speak", res.speak, source="agent")
        except Exception as exc:  # a backbone failure ends the turn, never the daemon
            log.exception("turn_failed", turn=res.turn)
            res.reason = "error"
            # A backbone's own errors carry a code (the remote backbone's ``backbone_unavailable``).
            failure = TurnError(getattr(exc, "code", None) or "internal", f"turn {res.turn} failed: {exc}")
            # Subscribers see it on the bus; a requester gets it as its one terminal event (below).
            self.bus.publish({"event": "error", "code": failure.code, "message": failure.message, "turn": res.turn})
        finally:
            self.in_turn = False
            res.seconds = time.perf_counter() - t0
            self.emit({"event": "wait", "turn": res.turn, "reason": res.reason})
            result = {"turn": res.turn, "speak": res.speak, "reason": res.reason}
            for obs in batch:
                if obs.done is not None and not obs.done.done():
                    if failure is not None:
                        obs.done.set_exception(failure)
                    else:
                        obs.done.set_result(result)
            self._listeners = []
        log.info("turn_done", turn=res.turn, reason=res.reason, segments=res.segments, execs=res.execs,
                 tokens=res.tokens, seconds=round(res.seconds, 3))
        return res

    async def _feed(self, tokens: list[int]) -> Tensor:
        """Prefill ``tokens`` into the state; the logits that predict the next token."""
        logits, self.state = await asyncio.to_thread(prefill, self.backbone, self.state, tokens)
        self.context.extend(tokens)
        if logits is None:
            raise RuntimeError("nothing to feed")
        return logits

    async def _generate(self, logits: Tensor, res: TurnResult, speak: list[str]) -> Stop:
        loop = asyncio.get_running_loop()
        turn = res.turn

        def on_event(ev: Delta | SegmentEnd | Notice) -> None:
            if isinstance(ev, Notice):  # not fatal: on the bus only, so a chat request goes on waiting
                self.bus.publish({"event": "error", "code": ev.code, "message": ev.message, "turn": turn, "fatal": False,
                                  **ev.data})
                return
            if isinstance(ev, Delta):
                if ev.kind != "exec":
                    self.emit({"event": ev.kind, "turn": turn, "delta": ev.text})
                if ev.kind == "speak":
                    speak.append(ev.text)
                return
            res.segments += 1
            if ev.kind == "exec":
                event = {"event": "exec", "turn": turn, "code": ev.text}
                res.events.append(event)  # the sandbox publishes it with its exec_id
                if self.executor is None:
                    self.emit(event)
            else:
                self.emit({"event": ev.kind, "turn": turn, "text": ev.text, "end": True})

        def work() -> Stop:
            gen = self.decoder.run(self.state, logits, self._cancel)
            while True:
                try:
                    ev = next(gen)
                except StopIteration as done:
                    return done.value
                loop.call_soon_threadsafe(on_event, ev)
                if isinstance(ev, SegmentEnd) and res.segments + 1 >= self.config.agent.max_segments_per_turn:
                    self._cancel.set()  # the guard applies mid-stretch too

        with torch.inference_mode():
            stop = await asyncio.to_thread(work)
        await asyncio.sleep(0)  # let the queued on_event callbacks run before the caller reads res
        self.state = stop.state
        self.context.extend(stop.ids)
        res.tokens += len(stop.ids)
        if stop.reason == "cancelled" and res.segments >= self.config.agent.max_segments_per_turn:
            stop.reason = "guard"  # type: ignore[assignment]
        return stop

    async def _execute(self, code: str, res: TurnResult) -> list[int]:
        """Run EXEC code; the RESULT observation tokens. Failures are results, not errors."""
        tok = self.backbone.tokenizer
        max_bytes = self.config.agent.observation_max_bytes
        if self.executor is None:
            text = "error: code execution is not available in this agent"
            self.emit({"event": "exec_result", "turn": res.turn, "exit_code": None, "stdout": "", "stderr": text,
                       "timed_out": False, "limit": "unavailable", "cpu_s": 0.0, "peak_rss_mb": 0.0, "truncated": False})
            return tok.wrap("RESULT", text)
        r = await self.executor.execute(code, turn=res.turn)
        text = transcript.exec_result_text(r.stdout, r.stderr, r.exit_code if r.exit_code is not None else -1,
                                           r.timed_out, r.limit)
        if self.memory is not None:
            self.memory.remember("exec", f"{code}\n=> {text}", source="sandbox")
        return tok.wrap("RESULT", transcript.clip(text, max_bytes))
