"""Long-term memory: SQLite (WAL) is the truth, a FAISS index is a cache that can always be rebuilt.

Layout of a store directory::

    memory.sqlite3 (+ -wal, -shm)   every memory: text, metadata, embedding (schema.py)
    index.faiss                     the FAISS snapshot (index.py), written atomically
    memory.lock                     flock held while the store is open: one process at a time

Recovery on open (``LongTermMemory.open``):

1. migrate the schema; rows without an embedding (v1 rows, an interrupted re-index) are embedded;
   a different embedding model or dimension than the one recorded re-embeds every row;
2. load the index snapshot; a missing, corrupt or mismatched (model, dim) file -> rebuild from the
   stored embeddings, with a ``memory.index_rebuild`` warning, never a crash;
3. check it against SQLite: every id up to the snapshot's watermark must be in it exactly once
   (ntotal == rows + deleted-since); ids deleted since are dropped; rows past the watermark are
   replayed from their stored embeddings.

``LongTermMemory`` is the synchronous core (thread-safe, one lock around SQLite and FAISS);
``MemoryStore`` is the asyncio face the daemon uses: every call runs on one dedicated worker
thread, and concurrent ``add`` calls are coalesced into one embedding batch and one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import numpy as np
import structlog

from agentd.config import MemorySection
from memory_store.embedding import Embedder, default_embedder
from memory_store.errors import (
    ImportFormatError,
    InvalidMemoryError,
    MemoryStoreError,
    StorageError,
    StoreClosedError,
)
from memory_store.index import HnswParams, IndexFileError, IndexKind, VectorIndex, set_faiss_threads
from memory_store.schema import SCHEMA_VERSION, migrate
from models.base import atomic_write_bytes

log = structlog.get_logger("memory_store")

DB_NAME = "memory.sqlite3"
INDEX_NAME = "index.faiss"
LOCK_NAME = "memory.lock"
MAX_TEXT_CHARS = 65536
_CHUNK = 2048  # rows per SELECT / executemany when walking the whole table
_T = TypeVar("_T")
_P = ParamSpec("_P")


@dataclass(frozen=True)
class NewMemory:
    """A memory to store. ``time`` defaults to now; ``meta`` must be a JSON object."""

    text: str
    kind: str = "note"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    time: float | None = None


@dataclass(frozen=True)
class Memory:
    id: int
    time: float
    kind: str
    source: str
    text: str
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Hit(Memory):
    score: float = 0.0  # cosine similarity to the query


def normalise_text(text: str) -> str:
    """The form dedup compares: NFKC, whitespace runs collapsed, ends stripped. Case is kept
    (``Print(x)`` and ``print(x)`` are different code)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def _validate(m: NewMemory) -> tuple[NewMemory, str]:
    if not isinstance(m.text, str) or not normalise_text(m.text):
        raise InvalidMemoryError("memory text must be a non-empty string")
    if len(m.text) > MAX_TEXT_CHARS:
        raise InvalidMemoryError(f"memory text is {len(m.text)} characters, the limit is {MAX_TEXT_CHARS}")
    if not isinstance(m.kind, str) or not m.kind or not isinstance(m.source, str):
        raise InvalidMemoryError("kind must be a non-empty string and source a string")
    if not isinstance(m.meta, dict):
        raise InvalidMemoryError("meta must be a JSON object")
    if m.time is not None and (not isinstance(m.time, int | float) or not math.isfinite(m.time)):
        raise InvalidMemoryError("time must be a finite number of unix seconds")
    try:
        meta_json = json.dumps(m.meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMemoryError(f"meta is not JSON-serialisable: {exc}") from exc
    return m, meta_json


def _storage_errors(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Convert SQLite and file-system errors into StorageError (the package's boundary)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{fn.__name__} failed: {exc}") from exc

    return wrapper


def _options(cfg: MemorySection) -> HnswParams:
    return HnswParams(m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef_search=cfg.hnsw_ef_search)


class LongTermMemory:
    """The synchronous store. Every public method takes one lock, so it may be called from any
    thread; ``MemoryStore`` calls it from a single worker thread."""

    def __init__(self, directory: str | os.PathLike[str], cfg: MemorySection | None = None, *, embedder: Embedder | None = None) -> None:
        self.dir = Path(directory)
        self.cfg = cfg or MemorySection()
        self._embedder = embedder
        self._hnsw = _options(self.cfg)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._lockfile: int | None = None
        self._index: VectorIndex | None = None
        self._max_id = 0  # highest id the in-memory index holds
        self._unsaved = 0  # memories added to the index since its last snapshot
        self._dirty = False  # the in-memory index differs from the snapshot on disk
        self._store_id = ""  # random, made at creation; ties the index file to this database
        self._needs_rebuild = False  # a FAISS insert failed: the index misses committed rows
        self.recovery: dict[str, Any] = {}  # what open() had to do (for stats and tests)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder(self.cfg.embedding_model, self.cfg.embedding_batch, self.cfg.threads)
        return self._embedder

    @property
    def db_path(self) -> Path:
        return self.dir / DB_NAME

    @property
    def index_path(self) -> Path:
        return self.dir / INDEX_NAME

    def open(self) -> LongTermMemory:
        with self._lock:
            if self._db is not None:
                return self
            t0 = time.perf_counter()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._take_lock()
                self._db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: an acknowledged memory survives power loss, not only a process crash.
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA busy_timeout=5000")
                from_version = migrate(self._db)
                self.recovery = {"schema_from": from_version}
                self._store_id = self._kv("store_id")
                if not self._store_id:
                    self._store_id = uuid.uuid4().hex
                    with self._tx() as tx:
                        self._set_kv(tx, store_id=self._store_id)
                self._check_model()
                self._embed_missing()
                self._load_index()
            except (sqlite3.Error, OSError) as exc:
                self._close_quietly()
                raise StorageError(f"cannot open the memory store {self.dir}: {exc}") from exc
            except BaseException:
                self._close_quietly()
                raise
            log.info(
                "memory.opened", path=str(self.dir), memories=self._count(), index=self._idx.kind,
                ntotal=self._idx.ntotal, seconds=round(time.perf_counter() - t0, 3), **self.recovery,
            )
            return self

    def close(self) -> None:
        with self._lock:
            if self._db is None:
                return
            try:
                if self._dirty:
                    self._save_index()
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("memory.close_checkpoint_failed", error=str(exc))
            finally:
                self._close_quietly()

    def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        self._index = None
        if self._lockfile is not None:
            os.close(self._lockfile)  # closing the descriptor releases the flock
            self._lockfile = None

    def _take_lock(self) -> None:
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"the memory store {self.dir} is open in another process (is the daemon running?)") from None
        self._lockfile = fd

    def __enter__(self) -> LongTermMemory:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------
    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosedError("the memory store is not open")
        return self._db

    @property
    def _idx(self) -> VectorIndex:
        if self._index is None:
            raise StoreClosedError("the memory store is not open")
        set_faiss_threads(self.cfg.threads)  # per calling thread, so set where FAISS is used
        return self._index

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _kv(self, key: str, default: str = "") -> str:
        row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @staticmethod
    def _set_kv(db: sqlite3.Connection, **values: object) -> None:
        db.executemany("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       [(k, str(v)) for k, v in values.items()])

    def _count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM memories").fetchone()[0])

    def _wanted_kind(self, count: int) -> IndexKind:
        # Hysteresis: an HNSW index goes back to flat only well below the threshold, so a store
        # hovering around it is not rebuilt at every compaction.
        current = self._index.kind if self._index is not None else "flat"
        if count >= self.cfg.index_switch_at:
            return "hnsw"
        if current == "hnsw" and count >= self.cfg.index_switch_at // 2:
            return "hnsw"
        return "flat"

    # -- recovery steps ------------------------------------------------------------------------
    def _check_model(self) -> None:
        """A store embedded by another model (or dimension) is re-embedded: vectors from two
        models are not comparable. Clearing the vectors first makes the re-index resumable."""
        name, dim = self.embedder.name, self.embedder.dim
        old_name, old_dim = self._kv("embedding_model"), self._kv("embedding_dim")
        if old_name == name and old_dim == str(dim):
            return
        with self._tx() as db:
            n = int(db.execute("SELECT count(*) FROM memories WHERE vector IS NOT NULL").fetchone()[0])
            if old_name and n:
                log.warning("memory.reindex", reason="embedding model changed", old_model=old_name, old_dim=old_dim,
                            model=name, dim=dim, memories=n)
                db.execute("UPDATE memories SET vector = NULL")
                self.recovery["reindexed"] = n
            self._set_kv(db, embedding_model=name, embedding_dim=dim, watermark=0)

    def _embed_missing(self) -> None:
        db = self._conn
        total = int(db.execute("SELECT count(*) FROM memories WHERE vector IS NULL").fetchone()[0])
        if not total:
            return
        log.info("memory.embedding_missing", memories=total)
        done = 0
        while True:
            rows = db.execute("SELECT id, text FROM memories WHERE vector IS NULL ORDER BY id LIMIT ?",
                              (max(self.cfg.embedding_batch, 256),)).fetchall()
            if not rows:
                break
            vecs = self.embedder.embed([r[1] for r in rows])
            with self._tx() as tx:
                tx.executemany("UPDATE memories SET vector = ? WHERE id = ?",
                               [(v.tobytes(), r[0]) for r, v in zip(rows, vecs, strict=True)])
            done += len(rows)
            log.debug("memory.embedding_progress", done=done, total=total)
        self.recovery["embedded"] = done

    def _load_index(self) -> None:
        emb = self.embedder
        count = self._count()
        reason = ""
        index: VectorIndex | None = None
        watermark = 0
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            reason = "index file missing" if count else ""
        except OSError as exc:
            reason = f"index file unreadable: {exc}"
        else:
            try:
                index, header = VectorIndex.from_bytes(data, self._hnsw)
                watermark = header.watermark
                if header.store_id != self._store_id:
                    reason, index = f"index belongs to store {header.store_id!r}, this is {self._store_id!r}", None
                elif header.model != emb.name or header.dim != emb.dim:
                    reason, index = f"index built by {header.model}/{header.dim}, model is {emb.name}/{emb.dim}", None
            except IndexFileError as exc:
                reason = f"index file corrupt: {exc}"
        if index is not None:
            reason = self._reconcile(index, watermark)
            if reason:
                index = None
        if index is None:
            if reason:
                log.warning("memory.index_rebuild", reason=reason, memories=count, path=str(self.index_path))
                self.recovery["rebuilt"] = reason
            self._rebuild(self._wanted_kind(count))
            return
        self._index = index
        self._max_id = watermark
        replayed = self._replay_after(watermark)
        if replayed:
            log.info("memory.index_replay", memories=replayed, watermark=watermark)
            self.recovery["replayed"] = replayed
        if self._wanted_kind(count) != index.kind:
            self._rebuild(self._wanted_kind(count))

    def _reconcile(self, index: VectorIndex, watermark: int) -> str:
        """Fit a loaded snapshot to SQLite; returns why it cannot be used ("" = it can).

        Rows up to the watermark must all be in the index, once each (ntotal == those rows plus
        rows deleted since the snapshot); ids it holds that SQLite no longer has are dropped."""
        ids = index.ids()
        if len(ids) and int(ids.max()) > watermark:
            return f"index holds id {int(ids.max())} past its watermark {watermark}"
        db_ids = np.array([r[0] for r in self._conn.execute("SELECT id FROM memories WHERE id <= ? ORDER BY id", (watermark,))],
                          dtype=np.int64)
        uniq = np.unique(ids)
        if len(uniq) != len(ids):
            return "index holds duplicate ids"
        missing = np.setdiff1d(db_ids, uniq, assume_unique=True)
        if len(missing):
            return f"ntotal {index.ntotal} does not cover SQLite's {len(db_ids)} memories up to the watermark ({len(missing)} missing)"
        deleted = np.setdiff1d(uniq, db_ids, assume_unique=True)
        if len(deleted):
            index.remove(deleted)
            self._dirty = True
            self.recovery["dropped_deleted"] = int(len(deleted))
        return ""

    def _iter_vectors(self, after: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) chunks of every row with id > ``after``, in id order."""
        dim, last = self.embedder.dim, after
        while True:
            rows = self._conn.execute("SELECT id, vector FROM memories WHERE id > ? ORDER BY id LIMIT ?", (last, _CHUNK)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            last = int(ids[-1])
            yield ids, vecs

    def _replay_after(self, watermark: int) -> int:
        n = 0
        for ids, vecs in self._iter_vectors(watermark):
            self._idx.add(ids, vecs)
            self._max_id = max(self._max_id, int(ids[-1]))
            n += len(ids)
        self._unsaved += n
        self._dirty = self._dirty or n > 0
        return n

    def _rebuild(self, kind: IndexKind) -> None:
        """A fresh index of ``kind`` from the embeddings in SQLite, snapshotted at once."""
        t0 = time.perf_counter()
        self._index = VectorIndex(self.embedder.dim, kind, self._hnsw)
        self._max_id = 0
        self._needs_rebuild = False
        self._replay_after(0)
        self._save_index()
        log.info("memory.index_built", kind=kind, ntotal=self._idx.ntotal, seconds=round(time.perf_counter() - t0, 3))

    def _save_index(self) -> None:
        """Snapshot the index: temp file in the same directory, fsync, rename, fsync the directory
        (models.base.atomic_write_bytes); then record its watermark in SQLite."""
        data = self._idx.to_bytes(self.embedder.name, self._max_id, self._store_id)
        try:
            atomic_write_bytes(self.index_path, data)
        except OSError as exc:
            # The index stays usable in memory; the next open replays or rebuilds.
            log.warning("memory.index_save_failed", error=str(exc), path=str(self.index_path))
            return
        with self._tx() as db:
            self._set_kv(db, watermark=self._max_id, index_kind=self._idx.kind)
        self._unsaved = 0
        self._dirty = False
        log.debug("memory.index_saved", ntotal=self._idx.ntotal, watermark=self._max_id, bytes=len(data))

    # -- public API ------------------------------------------------------------------------------
    def add(self, text: str, *, kind: str = "note", source: str = "", meta: dict[str, Any] | None = None,
            time: float | None = None) -> int:
        """Store one memory (or find its duplicate); returns its id once committed."""
        return self.add_many([NewMemory(text, kind, source, dict(meta or {}), time)])[0][0]

    @_storage_errors
    def add_many(self, items: list[NewMemory]) -> list[tuple[int, bool]]:
        """Store a batch: one embedding call and one transaction. Returns, per item, its memory id
        and whether it was a duplicate of a memory already stored (or of an earlier item)."""
        checked = [_validate(m) for m in items]
        hashes = [text_hash(m.text) for m, _ in checked]
        with self._lock:
            db = self._conn
            existing: dict[str, int] = {}
            uniq = list(dict.fromkeys(hashes))
            for i in range(0, len(uniq), 500):
                part = uniq[i : i + 500]
                q = f"SELECT text_hash, id FROM memories WHERE text_hash IN ({','.join('?' * len(part))})"
                existing.update(db.execute(q, part).fetchall())
            fresh: dict[str, int] = {}  # hash -> index of the first item carrying it
            for i, h in enumerate(hashes):
                if h not in existing and h not in fresh:
                    fresh[h] = i
            order = list(fresh.values())
            vecs = self.embedder.embed([checked[i][0].text for i in order]) if order else None
            now = time.time()
            new_ids: dict[str, int] = {}
            if order:
                try:
                    with self._tx() as tx:
                        for j, i in enumerate(order):
                            m, meta_json = checked[i]
                            cur = tx.execute(
                                "INSERT INTO memories(time, kind, source, text, meta, text_hash, vector) VALUES(?,?,?,?,?,?,?)",
                                (float(m.time if m.time is not None else now), m.kind, m.source, m.text, meta_json,
                                 hashes[i], vecs[j].tobytes()),  # type: ignore[index]
                            )
                            new_ids[hashes[i]] = int(cur.lastrowid)  # type: ignore[arg-type]
                except sqlite3.Error as exc:
                    raise StorageError(f"storing {len(order)} memories failed: {exc}") from exc
                ids = np.fromiter((new_ids[hashes[i]] for i in order), dtype=np.int64, count=len(order))
                # After the commit: SQLite is the truth. Should FAISS fail here, the memories are
                # still stored; the index is rebuilt from SQLite at the next compaction.
                try:
                    self._idx.add(ids, vecs)  # type: ignore[arg-type]
                except RuntimeError as exc:
                    log.error("memory.index_add_failed", error=str(exc), memories=len(ids))
                    self._needs_rebuild = True
                self._max_id = max(self._max_id, int(ids.max()))
                self._unsaved += len(order)
                self._dirty = True
            out: list[tuple[int, bool]] = []
            for i, h in enumerate(hashes):
                if h in existing:
                    out.append((existing[h], True))
                else:
                    out.append((new_ids[h], fresh[h] != i))
            return out

    @_storage_errors
    def search(self, query: str, k: int = 5, *, min_score: float | None = None) -> list[Hit]:
        """The ``k`` memories most similar to ``query`` (cosine), best first."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidMemoryError("query must be a non-empty string")
        if k <= 0:
            return []
        qv = self.embedder.embed([query])[0]
        with self._lock:
            found = self._idx.search(qv, k)
            if min_score is not None:
                found = [(i, s) for i, s in found if s >= min_score]
            rows = self._rows([i for i, _ in found])
        return [Hit(**asdict(rows[i]), score=s) for i, s in found if i in rows]

    def _rows(self, ids: list[int]) -> dict[int, Memory]:
        if not ids:
            return {}
        q = f"SELECT id, time, kind, source, text, meta FROM memories WHERE id IN ({','.join('?' * len(ids))})"
        return {r[0]: Memory(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in self._conn.execute(q, ids)}

    @_storage_errors
    def get(self, memory_id: int) -> Memory | None:
        with self._lock:
            return self._rows([memory_id]).get(memory_id)

    @_storage_errors
    def count(self) -> int:
        with self._lock:
            return self._count()

    @_storage_errors
    def stats(self) -> dict[str, Any]:
        with self._lock:
            db = self._conn
            count, oldest, newest = db.execute("SELECT count(*), min(time), max(time) FROM memories").fetchone()
            kinds = dict(db.execute("SELECT kind, count(*) FROM memories GROUP BY kind ORDER BY kind").fetchall())
            idx = self._idx

            def size(p: Path) -> int:
                return p.stat().st_size if p.exists() else 0

            return {
                "memories": int(count),
                "kinds": kinds,
                "oldest": oldest,
                "newest": newest,
                "index": idx.kind,
                "index_ntotal": idx.ntotal,
                "index_stale": len(idx.stale),
                "index_unsaved": self._unsaved,
                "watermark": int(self._kv("watermark", "0")),
                "model": self.embedder.name,
                "dim": self.embedder.dim,
                "schema_version": SCHEMA_VERSION,
                "db_bytes": size(self.db_path) + size(self.db_path.with_name(DB_NAME + "-wal")),
                "index_bytes": size(self.index_path),
                "recovery": dict(self.recovery),
            }

    @_storage_errors
    def compact(self, now: float | None = None) -> dict[str, Any]:
        """Apply retention (``max_age_days``, ``max_memories``), keep the index healthy (drop the
        deleted, rebuild when too much of an HNSW graph is stale, switch flat <-> HNSW by size)
        and snapshot it once ``index_save_rows`` memories were added since the last one."""
        now = time.time() if now is None else now
        with self._lock:
            db = self._conn
            doomed: set[int] = set()
            if self.cfg.max_age_days > 0:
                cutoff = now - self.cfg.max_age_days * 86400.0
                doomed.update(r[0] for r in db.execute("SELECT id FROM memories WHERE time < ?", (cutoff,)))
            if self.cfg.max_memories > 0:
                doomed.update(r[0] for r in db.execute(
                    "SELECT id FROM memories ORDER BY time DESC, id DESC LIMIT -1 OFFSET ?", (self.cfg.max_memories,)))
            if doomed:
                ids = sorted(doomed)
                try:
                    with self._tx() as tx:
                        tx.executemany("DELETE FROM memories WHERE id = ?", [(i,) for i in ids])
                except sqlite3.Error as exc:
                    raise StorageError(f"retention delete failed: {exc}") from exc
                self._idx.remove(ids)
                self._dirty = True
                log.info("memory.retention", deleted=len(ids), max_memories=self.cfg.max_memories, max_age_days=self.cfg.max_age_days)
            rebuilt = ""
            count = self._count()
            if self._wanted_kind(count) != self._idx.kind:
                rebuilt = f"{self._idx.kind} -> {self._wanted_kind(count)} at {count} memories"
            elif self._needs_rebuild:
                rebuilt = "an index insert failed earlier"
            elif self._idx.stale_fraction() > 0.2:
                rebuilt = f"{len(self._idx.stale)} of {self._idx.ntotal} HNSW entries stale"
            if rebuilt:
                log.info("memory.index_compact_rebuild", reason=rebuilt)
                self._rebuild(self._wanted_kind(count))
            saved = False
            if self._unsaved >= self.cfg.index_save_rows or (self._dirty and doomed):
                self._save_index()
                saved = True
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            return {"deleted": len(doomed), "rebuilt": rebuilt, "saved": saved, "memories": count}

    @_storage_errors
    def save_index(self) -> None:
        """Snapshot the index now if it changed since the last snapshot."""
        with self._lock:
            if self._dirty:
                self._save_index()

    def iter_memories(self) -> Iterator[Memory]:
        last = 0
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT id, time, kind, source, text, meta FROM memories WHERE id > ? ORDER BY id LIMIT ?", (last, _CHUNK)
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield Memory(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]))
            last = rows[-1][0]

    def export(self, path: str | os.PathLike[str]) -> int:
        """Write every memory as JSON Lines (id, time, kind, source, text, meta), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        n = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for m in self.iter_memories():
                    f.write(json.dumps(m.to_json(), ensure_ascii=False) + "\n")
                    n += 1
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"export to {path} failed: {exc}") from exc
        log.info("memory.exported", path=str(path), memories=n)
        return n

    @_storage_errors
    def import_(self, path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Add the memories of a JSON Lines file (as written by ``export``; ``text`` is required,
        ``time``, ``kind``, ``source``, ``meta`` optional, ``id`` ignored). Every line is checked
        before anything is stored, so a bad file imports nothing. Duplicates are skipped."""
        items = read_jsonl(path)
        added = dups = 0
        step = max(self.cfg.embedding_batch, 256)
        for i in range(0, len(items), step):
            for _, dup in self.add_many(items[i : i + step]):
                dups += dup
                added += not dup
            if progress is not None:
                progress(min(step, len(items) - i))
        log.info("memory.imported", path=str(path), read=len(items), added=added, duplicates=dups)
        return {"read": len(items), "added": added, "duplicates": dups}


def read_jsonl(path: str | os.PathLike[str]) -> list[NewMemory]:
    """Parse and validate an export file; raises ImportFormatError naming the first bad line."""
    items: list[NewMemory] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise InvalidMemoryError("not a JSON object")
                    m = NewMemory(obj["text"], obj.get("kind", "note"), obj.get("source", ""), obj.get("meta") or {}, obj.get("time"))
                    _validate(m)
                except KeyError:
                    raise ImportFormatError(f"{path}:{lineno}: no 'text'") from None
                except (ValueError, InvalidMemoryError) as exc:
                    raise ImportFormatError(f"{path}:{lineno}: {exc}") from None
                items.append(m)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ImportFormatError(f"{path} is not UTF-8: {exc}") from None
    return items


class MemoryStore:
    """The asyncio face of ``LongTermMemory``::

        async with MemoryStore(data_dir / "memory", cfg.memory) as m:
            mid = await m.add("the door code is 4711", kind="note", source="chat")
            hits = await m.search("door code", k=3)

    All blocking work (SQLite, FAISS, the embedding model) runs on one dedicated worker thread,
    so the event loop never waits on it and the store sees one call at a time. ``add`` resolves
    only after the SQLite commit. Adds that arrive while the worker is busy are coalesced, up to
    ``embedding_batch`` at a time, into one embedding batch and one transaction.
    """

    def __init__(self, directory: str | os.PathLike[str], cfg: MemorySection | None = None, *, embedder: Embedder | None = None) -> None:
        self.core = LongTermMemory(directory, cfg, embedder=embedder)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[NewMemory, asyncio.Future[tuple[int, bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> MemoryStore:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-store")
        self._closing = False
        try:
            await self._run(self.core.open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish queued adds, snapshot the index, close. Safe to call twice."""
        if self._executor is None:
            return
        self._closing = True
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        try:
            await self._run(self.core.close)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def is_open(self) -> bool:
        return self._executor is not None and not self._closing

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise StoreClosedError("the memory store is not open (use `async with MemoryStore(...)`)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- adds, coalesced -------------------------------------------------------------------------
    async def add(self, text: str, *, kind: str = "note", source: str = "", meta: dict[str, Any] | None = None,
                  time: float | None = None) -> int:
        """Store a memory; returns its id (an existing one for a duplicate) after the commit."""
        return (await self.add_ex(NewMemory(text, kind, source, dict(meta or {}), time)))[0]

    async def add_ex(self, item: NewMemory) -> tuple[int, bool]:
        """``add`` returning ``(memory_id, duplicate)``."""
        if not self.is_open:
            raise StoreClosedError("the memory store is not open")
        _validate(item)  # a bad item fails alone, before it can join (and fail) a batch
        fut: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def add_many(self, items: Iterable[NewMemory]) -> list[int]:
        return [mid for mid, _ in await asyncio.gather(*(self.add_ex(m) for m in items))]

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let adds made in the same loop iteration join the first batch
        while self._pending:
            batch = self._pending[: self.core.cfg.embedding_batch]
            del self._pending[: len(batch)]
            try:
                results = await self._run(self.core.add_many, [m for m, _ in batch])
            except MemoryStoreError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            except Exception as exc:  # a bug below: report it to every waiter, keep the store up
                err = MemoryStoreError(f"storing memories failed: {exc!r}")
                log.exception("memory.add_failed", batch=len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            else:
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():  # the caller may have been cancelled; the memory is stored anyway
                        fut.set_result(res)

    # -- the rest --------------------------------------------------------------------------------
    async def search(self, query: str, k: int = 5, *, min_score: float | None = None) -> list[Hit]:
        return await self._run(lambda: self.core.search(query, k, min_score=min_score))

    async def get(self, memory_id: int) -> Memory | None:
        return await self._run(self.core.get, memory_id)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self.core.stats)

    async def compact(self, now: float | None = None) -> dict[str, Any]:
        return await self._run(self.core.compact, now)

    async def save_index(self) -> None:
        await self._run(self.core.save_index)

    async def export(self, path: str | os.PathLike[str]) -> int:
        return await self._run(self.core.export, path)

    async def import_(self, path: str | os.PathLike[str]) -> dict[str, int]:
        return await self._run(self.core.import_, path)
