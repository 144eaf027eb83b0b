"""Long-term memory with the real MiniLM and real FAISS: dedup, search, recovery of the index from
SQLite (replay, missing / garbage / foreign / short index, model change), schema migrations,
retention, export/import, coalesced adds."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from memhelpers import HashEmbedder, distinct_texts
from structlog.testing import capture_logs

from agentd.config import MemorySection
from memory_store import (
    SCHEMA_VERSION,
    Embedder,
    ImportFormatError,
    InvalidMemoryError,
    LongTermMemory,
    MemoryStore,
    NewMemory,
    SchemaError,
    StorageError,
    StoreClosedError,
)
from memory_store.index import VectorIndex
from memory_store.schema import SCHEMA_V1

CFG = MemorySection()


def warnings(logs: list[dict], event: str) -> list[dict]:
    return [e for e in logs if e["event"] == event and e["log_level"] == "warning"]


def open_store(path: Path, embedder: Embedder, **cfg: object) -> LongTermMemory:
    return LongTermMemory(path, MemorySection(**cfg), embedder=embedder).open()  # type: ignore[arg-type]


def crash(store: LongTermMemory) -> None:
    """Drop the store as kill -9 would: no index snapshot, no checkpoint."""
    store._close_quietly()


# -- basics ---------------------------------------------------------------------------------------
def test_dedup_returns_the_existing_id(tmp_path: Path, embedder: Embedder) -> None:
    with open_store(tmp_path, embedder) as m:
        a = m.add("The door code is 4711.", kind="note", source="chat")
        assert m.add("  The door   code is 4711.\n", kind="observation") == a  # whitespace is normalised
        assert m.add("the door code is 4711.") != a  # case is kept
        res = m.add_many([NewMemory("x marks the spot"), NewMemory("x  marks the spot"), NewMemory("The door code is 4711.")])
        assert [d for _, d in res] == [False, True, True]
        assert res[0][0] == res[1][0] and res[2][0] == a
        assert m.count() == 3
        assert m.stats()["index_ntotal"] == 3


def test_invalid_memories_are_refused(tmp_path: Path, embedder: Embedder) -> None:
    with open_store(tmp_path, embedder) as m:
        for bad in (NewMemory("   "), NewMemory("ok", meta=[1]), NewMemory("ok", meta={"f": {1, 2}}),  # type: ignore[arg-type]
                    NewMemory("ok", kind=""), NewMemory("ok", time=float("nan"))):
            with pytest.raises(InvalidMemoryError):
                m.add_many([bad])
        assert m.count() == 0


def test_search_finds_each_memory_top1_by_its_own_text(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(200, seed=1)
    with open_store(tmp_path, embedder) as m:
        ids = [i for i, _ in m.add_many([NewMemory(t, meta={"n": n}) for n, t in enumerate(texts)])]
        for n in range(0, 200, 9):
            hits = m.search(texts[n], k=3)
            assert hits[0].id == ids[n] and hits[0].text == texts[n] and hits[0].meta == {"n": n}
            assert hits[0].score > 0.99 and hits[0].score > hits[1].score
        assert m.search(texts[0], k=3, min_score=1.5) == []


def test_second_process_cannot_open_the_same_store(tmp_path: Path, embedder: Embedder) -> None:
    with open_store(tmp_path, embedder):
        with pytest.raises(StorageError, match="another process"):
            open_store(tmp_path, embedder)
    open_store(tmp_path, embedder).close()  # the lock went with the first store


# -- recovery -------------------------------------------------------------------------------------
def test_rows_past_the_watermark_are_replayed(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(30, seed=2)
    with open_store(tmp_path, embedder) as m:
        m.add_many([NewMemory(t) for t in texts[:20]])
    m = open_store(tmp_path, embedder)
    assert m.stats()["watermark"] == 20
    m.add_many([NewMemory(t) for t in texts[20:]])
    crash(m)  # the index snapshot still holds 20
    with capture_logs() as logs, open_store(tmp_path, embedder) as m:
        assert m.recovery.get("replayed") == 10 and "rebuilt" not in m.recovery
        assert m.stats()["index_ntotal"] == 30
        assert m.search(texts[25], 1)[0].text == texts[25]
    assert not [e for e in logs if e["log_level"] == "warning"]


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "empty"])
def test_damaged_index_is_rebuilt_with_a_warning(tmp_path: Path, embedder: Embedder, damage: str) -> None:
    texts = distinct_texts(40, seed=3)
    with open_store(tmp_path, embedder) as m:
        m.add_many([NewMemory(t) for t in texts])
        path = m.index_path
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    with capture_logs() as logs, open_store(tmp_path, embedder) as m:
        assert m.stats()["index_ntotal"] == 40
        assert m.search(texts[7], 1)[0].text == texts[7]
    (w,) = warnings(logs, "memory.index_rebuild")
    assert w["memories"] == 40 and w["reason"]
    with capture_logs() as logs, open_store(tmp_path, embedder):
        pass
    assert not warnings(logs, "memory.index_rebuild")  # the rebuilt snapshot is good


def test_index_that_does_not_cover_sqlite_is_rebuilt(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(20, seed=4)
    with open_store(tmp_path, embedder) as m:
        m.add_many([NewMemory(t) for t in texts])
        store_id = m._store_id
        path = m.index_path
    # A snapshot claiming watermark 20 but holding only ids 1..10: ntotal does not match SQLite.
    short = VectorIndex(embedder.dim)
    short.add(np.arange(1, 11, dtype=np.int64), embedder.embed(texts[:10]))
    path.write_bytes(short.to_bytes(embedder.name, 20, store_id))
    with capture_logs() as logs, open_store(tmp_path, embedder) as m:
        assert m.stats()["index_ntotal"] == 20
    (w,) = warnings(logs, "memory.index_rebuild")
    assert "missing" in w["reason"]


def test_index_copied_from_another_store_is_not_trusted(tmp_path: Path, embedder: Embedder) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with open_store(a, embedder) as m:
        m.add_many([NewMemory(t) for t in distinct_texts(10, seed=5)])
    texts_b = distinct_texts(10, seed=6)
    with open_store(b, embedder) as m:
        m.add_many([NewMemory(t) for t in texts_b])
    (b / "index.faiss").write_bytes((a / "index.faiss").read_bytes())
    with capture_logs() as logs, open_store(b, embedder) as m:
        hit = m.search(texts_b[3], 1)[0]
        assert hit.text == texts_b[3] and hit.score > 0.99
    assert "belongs to store" in warnings(logs, "memory.index_rebuild")[0]["reason"]


def test_rows_deleted_behind_the_snapshot_are_dropped(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(10, seed=7)
    with open_store(tmp_path, embedder) as m:
        m.add_many([NewMemory(t) for t in texts])
    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    db.execute("DELETE FROM memories WHERE id IN (2, 3)")
    db.commit()
    db.close()
    with capture_logs() as logs, open_store(tmp_path, embedder) as m:
        assert m.recovery.get("dropped_deleted") == 2 and m.stats()["index_ntotal"] == 8
        assert {h.id for h in m.search(texts[1], 10)} == {1, 4, 5, 6, 7, 8, 9, 10}
    assert not warnings(logs, "memory.index_rebuild")


def test_model_change_reindexes_every_memory(tmp_path: Path, embedder: Embedder, hash_embedder: HashEmbedder) -> None:
    texts = distinct_texts(15, seed=8)
    with open_store(tmp_path, embedder) as m:
        m.add_many([NewMemory(t) for t in texts])
    with capture_logs() as logs, open_store(tmp_path, hash_embedder) as m:
        st = m.stats()
        assert (st["model"], st["dim"], st["index_ntotal"]) == (hash_embedder.name, 64, 15)
        assert m.search(texts[4], 1)[0].text == texts[4]
    (w,) = warnings(logs, "memory.reindex")
    assert w["old_model"] == embedder.name and w["model"] == hash_embedder.name and w["memories"] == 15
    with capture_logs() as logs, open_store(tmp_path, embedder) as m:  # and back
        assert m.stats()["dim"] == embedder.dim and m.search(texts[9], 1)[0].text == texts[9]
    assert warnings(logs, "memory.reindex")


# -- schema ---------------------------------------------------------------------------------------
def test_a_v1_database_is_migrated_and_embedded(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(5, seed=9)
    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    db.executescript(SCHEMA_V1)
    for i, t in enumerate(texts):
        db.execute("INSERT INTO memories(time, kind, source, text, meta, text_hash) VALUES(?, 'note', 'v1', ?, '{}', ?)",
                   (1000.0 + i, t, f"h{i}"))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with open_store(tmp_path, embedder) as m:
        assert m.recovery["schema_from"] == 1 and m.recovery["embedded"] == 5
        assert m.stats()["schema_version"] == SCHEMA_VERSION
        hit = m.search(texts[2], 1)[0]
        assert (hit.text, hit.source, hit.time) == (texts[2], "v1", 1002.0)
    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT count(*) FROM memories WHERE vector IS NULL").fetchone()[0] == 0
    db.close()


def test_a_database_from_a_newer_agentd_is_refused(tmp_path: Path, embedder: Embedder) -> None:
    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaError, match="upgrade agentd"):
        open_store(tmp_path, embedder)
    open_store(tmp_path / "other", embedder).close()  # the refused store released its lock


# -- retention ------------------------------------------------------------------------------------
def test_retention_by_count_and_age(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(12, seed=10)
    now = time.time()
    with open_store(tmp_path, embedder, max_memories=8, max_age_days=1.0) as m:
        # texts[0..1] are two days old; the rest are newer, texts[11] newest.
        m.add_many([NewMemory(t, time=now - 2 * 86400 if i < 2 else now - 100 + i) for i, t in enumerate(texts)])
        res = m.compact(now)
        assert res["deleted"] == 4 and m.count() == 8
        kept = {h.text for h in m.search(texts[0], 12)}
        assert kept == set(texts[4:])
        assert m.stats()["index_ntotal"] == 8


def test_hnsw_switch_and_stale_entries(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(40, seed=11)
    with open_store(tmp_path, embedder, index_switch_at=30, max_memories=36) as m:
        m.add_many([NewMemory(t, time=1000.0 + i) for i, t in enumerate(texts[:32])])
        assert m.stats()["index"] == "flat"
        assert "flat -> hnsw" in m.compact()["rebuilt"]
        m.add_many([NewMemory(t, time=1000.0 + 32 + i) for i, t in enumerate(texts[32:])])
        assert m.compact()["deleted"] == 4  # HNSW cannot remove: four stale entries, skipped in searches
        st = m.stats()
        assert (st["index"], st["index_stale"], st["memories"]) == ("hnsw", 4, 36)
        found = {h.text for h in m.search(texts[0], 40)}
        assert found == set(texts[4:])
        assert m.search(texts[20], 1)[0].text == texts[20]
    with open_store(tmp_path, embedder, index_switch_at=30) as m:  # the stale set is rebuilt on open
        assert m.stats()["index_stale"] == 4 and m.search(texts[2], 1)[0].text != texts[2]


# -- export / import ------------------------------------------------------------------------------
def test_export_import_round_trip(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(25, seed=12)
    out = tmp_path / "backup.jsonl"
    with open_store(tmp_path / "a", embedder) as m:
        m.add_many([NewMemory(t, kind="note" if i % 2 else "speak", source="s", meta={"i": i, "ü": "ß"}, time=500.0 + i)
                    for i, t in enumerate(texts)])
        assert m.export(out) == 25
        before = [(x.time, x.kind, x.source, x.text, x.meta) for x in m.iter_memories()]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25 and json.loads(lines[3])["meta"] == {"i": 3, "ü": "ß"}
    with open_store(tmp_path / "b", embedder) as m:
        assert m.import_(out) == {"read": 25, "added": 25, "duplicates": 0}
        assert [(x.time, x.kind, x.source, x.text, x.meta) for x in m.iter_memories()] == before
        assert m.import_(out) == {"read": 25, "added": 0, "duplicates": 25}
        assert m.search(texts[11], 1)[0].text == texts[11]


def test_import_of_a_bad_file_stores_nothing(tmp_path: Path, embedder: Embedder) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine", "meta": [1]}\n', encoding="utf-8")
    with open_store(tmp_path / "s", embedder) as m:
        with pytest.raises(ImportFormatError, match=":2:"):
            m.import_(bad)
        bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
        with pytest.raises(ImportFormatError, match=":2:"):
            m.import_(bad)
        assert m.count() == 0


# -- the async store ------------------------------------------------------------------------------
async def test_async_store_coalesces_concurrent_adds(tmp_path: Path, embedder: Embedder) -> None:
    texts = distinct_texts(150, seed=13)
    async with MemoryStore(tmp_path, CFG, embedder=embedder) as m:
        calls: list[int] = []
        real = m.core.add_many

        def spy(items: list[NewMemory]) -> list[tuple[int, bool]]:
            calls.append(len(items))
            return real(items)

        m.core.add_many = spy  # type: ignore[method-assign]
        ids = await asyncio.gather(*(m.add(t, kind="note", source="test") for t in texts), m.add(texts[0]))
        assert len(set(ids)) == 150 and ids[-1] == ids[0]
        assert sum(calls) == 151 and len(calls) <= 4 and max(calls) <= CFG.embedding_batch
        with pytest.raises(InvalidMemoryError):
            await m.add("")
        hits = await m.search(texts[77], k=2)
        assert hits[0].id == ids[77]
        assert (await m.stats())["memories"] == 150
        assert (await m.get(ids[5])).text == texts[5]  # type: ignore[union-attr]
    with pytest.raises(StoreClosedError):
        await m.add("after close")
    await m.aclose()  # twice is fine
