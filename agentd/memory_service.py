"""The daemon's side of memory: long-term memory, neural-state snapshots and what the loop remembers.

One ``MemoryService`` per daemon, an async context manager. The daemon calls it at a few points:

- start-up: ``async with MemoryService(config) as mem`` opens the store (index recovery included)
  and ``mem.restore(backbone)`` returns the newest valid ``Snapshot`` (or None);
- socket ops ``memory.add`` / ``memory.search`` / ``memory.stats`` (and ``memory.export`` /
  ``memory.import`` with a ``path`` the daemon writes or reads, for ``agentd memory export|import``
  while it runs): ``mem.handle(op, request)`` returns the ``done`` result or raises
  ``MemoryOpError(code, message)``;
- the loop: ``mem.remember(kind, text, source)`` after each observation, SPEAK, EXEC, result and
  notable condition change (stored in the background, deduplicated); ``mem.recall_tokens(text,
  tokenizer)`` in HOLD gives the MEM observation to feed the model, within the token budget;
- PAUSE: ``mem.pause(state, context, clock)`` snapshots the neural state and starts a compaction;
  shutdown: ``mem.snapshot(...)`` once more, then leaving the ``async with`` waits for the
  background stores, snapshots the index and closes SQLite;
- ``status``: ``mem.status()`` is the ``memory`` section.

With ``[memory] enabled = false`` the long-term store is not opened (the ops answer
``unavailable``, nothing is remembered or recalled); neural-state snapshots still run, since they are
what makes ``stop`` / ``start`` resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import structlog
from torch import Tensor

from agentd.config import Config
from memory_store import (
    Hit,
    ImportFormatError,
    InvalidMemoryError,
    MemoryStore,
    MemoryStoreError,
    NewMemory,
    Snapshot,
    SnapshotStore,
    StorageError,
    normalise_text,
)
from models import transcript
from models.base import Backbone, State

log = structlog.get_logger("agentd.memory")

MAX_SEARCH_K = 100
MEMORY_KINDS = ("speak", "think", "exec", "exec_result", "condition")  # as in [memory] remember; else "observation"


class MemoryOpError(Exception):
    """A socket request the memory service refuses; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Tokenizer(Protocol):
    def wrap(self, open_name: str, text: str) -> list[int]: ...


class MemoryService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cfg = config.memory
        self.store: MemoryStore | None = MemoryStore(config.data_dir / "memory", self.cfg) if self.cfg.enabled else None
        self.snapshots = SnapshotStore(config.data_dir / "snapshots", self.cfg.snapshots_keep)
        self._background: set[asyncio.Task[Any]] = set()
        self._storing: set[asyncio.Task[Any]] = set()  # remember() adds not yet committed
        self._compacting: asyncio.Task[Any] | None = None
        self._remembered = 0
        self._recalled = 0
        self._last_snapshot: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> MemoryService:
        if self.store is not None:
            await self.store.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for background stores and compaction, snapshot the index, close. Idempotent."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.store is not None:
            await self.store.aclose()

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.store.is_open

    # -- neural state ----------------------------------------------------------------------------
    def restore(self, backbone: Backbone) -> Snapshot | None:
        """The newest snapshot that reads, verifies and fits ``backbone`` (others are skipped
        with a ``memory.snapshot_skipped`` warning); None on a first start."""
        snap = self.snapshots.load_latest(backbone)
        if snap is not None:
            self._last_snapshot = {"seq": snap.seq, "position": snap.state.meta.position, "time": snap.created, "restored": True}
        return snap

    async def snapshot(self, state: State, context: list[int], clock: Mapping[str, Any],
                       extra: Mapping[str, Tensor] | None = None) -> None:
        """Snapshot the neural state now (PAUSE and shutdown). Errors are logged, not raised: a
        failed snapshot must not stop the agent; the previous one stays valid."""
        try:
            path = await self.snapshots.asave(state, context, clock, extra)
        except MemoryStoreError as exc:
            log.error("memory.snapshot_failed", error=str(exc))
            return
        self._last_snapshot = {"seq": int(path.stem.split("-")[-1]), "position": state.meta.position, "time": time.time(),
                               "restored": False}

    async def pause(self, state: State, context: list[int], clock: Mapping[str, Any],
                    extra: Mapping[str, Tensor] | None = None) -> None:
        """PAUSE: snapshot (awaited) and compaction (in the background, one at a time, so a chat
        that cuts the PAUSE short never waits for it)."""
        await self.snapshot(state, context, clock, extra)
        if self.enabled and (self._compacting is None or self._compacting.done()):
            self._compacting = self._spawn(self._compact())

    async def _compact(self) -> None:
        assert self.store is not None
        res = await self.store.compact()
        if res["deleted"] or res["rebuilt"]:
            log.info("memory.compacted", **res)

    # -- what the loop remembers and recalls -----------------------------------------------------
    def remember(self, kind: str, text: str, source: str = "agent", meta: dict[str, Any] | None = None) -> None:
        """Store ``text`` in the background if its kind is in ``[memory] remember`` (any kind not in
        ``MEMORY_KINDS``, e.g. ``chat``, counts as ``observation``). Never blocks the loop and never
        raises: a memory the agent makes for itself is best effort."""
        # Observations arrive with their own kind (chat, soma, ...); they are remembered when
        # "observation" is listed. Kinds the agent makes itself (speak, exec, ...) are listed as such.
        category = kind if kind in MEMORY_KINDS else "observation"
        if not self.enabled or category not in self.cfg.remember or not normalise_text(text or ""):
            return
        task = self._spawn(self._store_quietly(NewMemory(text[:8192], kind, source, dict(meta or {}))))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    async def _store_quietly(self, item: NewMemory) -> None:
        assert self.store is not None
        try:
            await self.store.add_ex(item)
            self._remembered += 1
        except MemoryStoreError as exc:
            log.warning("memory.remember_failed", kind=item.kind, error=str(exc))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # a strong reference until it is done
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("memory.background_failed", error=repr(exc))

    async def recall(self, text: str) -> list[Hit]:
        """Memories relevant to ``text`` (the current observation), best first, without the
        observation itself."""
        if not self.enabled or self.cfg.recall_k <= 0 or not normalise_text(text or ""):
            return []
        assert self.store is not None
        if self._storing:
            # Recall sees everything remembered before it: what a turn recalls must not depend on
            # how fast the embedding ran, or a restarted agent would not replay the same turns.
            await asyncio.gather(*self._storing, return_exceptions=True)
        try:
            hits = await self.store.search(text, self.cfg.recall_k + 1, min_score=self.cfg.recall_min_score)
        except MemoryStoreError as exc:
            log.warning("memory.recall_failed", error=str(exc))
            return []
        me = normalise_text(text)
        return [h for h in hits if normalise_text(h.text) != me][: self.cfg.recall_k]

    async def recall_tokens(self, text: str, tokenizer: Tokenizer) -> list[int]:
        """The MEM observation for HOLD: recalled memories, one per line, delimited by the MEM
        control tokens, at most ``recall_budget_tokens`` long (whole memories only; a first
        memory longer than the budget is cut). Empty when nothing relevant is found."""
        budget = self.cfg.recall_budget_tokens
        hits = await self.recall(text)
        if not hits or budget <= 2:
            return []
        lines: list[str] = []
        best: list[int] = []  # the MEM observation of the lines that fit so far
        for h in hits:
            # Rendered exactly as training renders it (models.transcript), and without a timestamp:
            # what the model is fed must not depend on the wall clock, or replaying the same
            # conversation (a restart, a test) would not give the same tokens.
            line = h.text
            toks = tokenizer.wrap("MEM", transcript.memory_text([*lines, line]))
            if len(toks) > budget:
                if not lines:  # cut the single best memory rather than recall nothing
                    cut = line
                    while cut:
                        toks = tokenizer.wrap("MEM", transcript.memory_text([cut + "…"]))
                        if len(toks) <= budget:
                            best = toks
                            break
                        cut = cut[: len(cut) - (len(toks) - budget)]  # >= 1 char shorter each time
                break
            lines.append(line)
            best = toks
        if best:
            self._recalled += 1
        return best

    # -- socket ops ------------------------------------------------------------------------------
    OPS = ("memory.add", "memory.search", "memory.stats", "memory.export", "memory.import")

    async def handle(self, op: str, req: Mapping[str, Any], source: str = "client") -> dict[str, Any]:
        """The ``done`` result of a memory op, or MemoryOpError. ``memory.add`` returns only after
        the SQLite commit."""
        if op not in self.OPS:
            raise MemoryOpError("unknown_op", f"unknown op {op!r}")
        if not self.enabled:
            raise MemoryOpError("unavailable", "long-term memory is disabled ([memory] enabled = false)")
        assert self.store is not None
        try:
            if op == "memory.add":
                text, meta = req.get("text"), req.get("meta", {})
                if text is None:
                    raise MemoryOpError("missing_field", "memory.add needs 'text'")
                if not isinstance(text, str) or not text.strip():
                    raise MemoryOpError("bad_field", "'text' must be a non-empty string")
                if meta is None:
                    meta = {}
                if not isinstance(meta, dict):
                    raise MemoryOpError("bad_field", "'meta' must be an object")
                kind = req.get("kind", "note")
                if not isinstance(kind, str) or not kind:
                    raise MemoryOpError("bad_field", "'kind' must be a non-empty string")
                mid, dup = await self.store.add_ex(NewMemory(text, kind, source, meta))
                return {"memory_id": mid, "duplicate": dup}
            if op == "memory.search":
                query, k = req.get("query"), req.get("k", 5)
                if query is None:
                    raise MemoryOpError("missing_field", "memory.search needs 'query'")
                if not isinstance(query, str) or not query.strip():
                    raise MemoryOpError("bad_field", "'query' must be a non-empty string")
                if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SEARCH_K:
                    raise MemoryOpError("bad_field", f"'k' must be an integer from 1 to {MAX_SEARCH_K}")
                hits = await self.store.search(query, k)
                return {"results": [{"memory_id": h.id, "text": h.text, "score": round(h.score, 6), "time": h.time,
                                     "kind": h.kind, "source": h.source, "meta": h.meta} for h in hits]}
            if op in ("memory.export", "memory.import"):
                path = req.get("path")
                if path is None:
                    raise MemoryOpError("missing_field", f"{op} needs 'path'")
                if not isinstance(path, str) or not Path(path).is_absolute():
                    raise MemoryOpError("bad_field", "'path' must be an absolute path on the daemon's machine")
                if op == "memory.export":
                    return {"count": await self.store.export(path)}
                return await self.store.import_(path)
            return await self.store.stats()
        except (InvalidMemoryError, ImportFormatError) as exc:
            raise MemoryOpError("bad_field", str(exc)) from exc
        except StorageError as exc:
            raise MemoryOpError("io_error", str(exc)) from exc

    # -- status ----------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """The ``memory`` section of ``status``."""
        out: dict[str, Any] = {"enabled": self.enabled, "snapshot": dict(self._last_snapshot),
                               "remembered": self._remembered, "recalls": self._recalled}
        if self.enabled:
            assert self.store is not None
            with contextlib.suppress(MemoryStoreError):
                st = await self.store.stats()
                out.update({k: st[k] for k in ("memories", "index", "index_ntotal", "watermark", "model")})
        return out
