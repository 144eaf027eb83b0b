"""The SQLite schema of long-term memory and its migrations.

``PRAGMA user_version`` holds the schema version. Every release's schema is reachable from every
earlier one by running the migrations in order, each in its own transaction, so an upgrade never
leaves a half-migrated database and a database from a newer agentd is refused, not damaged.

- v1 (first release): ``memories`` (id, time, kind, source, text, meta JSON, text_hash for dedup)
  and ``kv`` (index watermark, embedding model and dimension).
- v2: each row keeps its embedding (``vector``, float32 little-endian) so the FAISS index can be
  rebuilt or switched to HNSW without re-running the model; ``memories_time`` serves age retention.
  Rows migrated from v1 have no vector yet and are embedded when the store opens.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import structlog

from memory_store.errors import SchemaError

log = structlog.get_logger("memory_store")

SCHEMA_V1 = """
CREATE TABLE memories (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, FAISS relies on it
    time      REAL    NOT NULL,                   -- unix seconds
    kind      TEXT    NOT NULL,                   -- note | observation | speak | exec | exec_result | condition | ...
    source    TEXT    NOT NULL DEFAULT '',        -- who or what it came from (client, mqtt, agent)
    text      TEXT    NOT NULL,
    meta      TEXT    NOT NULL DEFAULT '{}',      -- a JSON object
    text_hash TEXT    NOT NULL UNIQUE             -- sha256 of the normalised text: dedup
);
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _create_v1(db: sqlite3.Connection) -> None:
    # Statement by statement: executescript would commit the migration's transaction.
    for stmt in filter(str.strip, SCHEMA_V1.split(";")):
        db.execute(stmt)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE memories ADD COLUMN vector BLOB")
    db.execute("CREATE INDEX memories_time ON memories(time)")


# MIGRATIONS[n] turns version n into version n + 1. Append only.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _create_v1,
    1: _v1_to_v2,
}
SCHEMA_VERSION = max(MIGRATIONS) + 1


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` (autocommit mode) to ``SCHEMA_VERSION``; returns the version it started at."""
    start = version_of(db)
    if start > SCHEMA_VERSION:
        raise SchemaError(
            f"memory database is schema version {start}, this agentd reads up to {SCHEMA_VERSION}; "
            "upgrade agentd or restore a backup"
        )
    for v in range(start, SCHEMA_VERSION):
        try:
            db.execute("BEGIN IMMEDIATE")
            MIGRATIONS[v](db)
            db.execute(f"PRAGMA user_version = {v + 1}")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise SchemaError(f"migrating the memory database from v{v} to v{v + 1} failed: {exc}") from exc
        if start > 0:
            log.info("memory.schema_migrated", from_version=v, to_version=v + 1)
    return start
