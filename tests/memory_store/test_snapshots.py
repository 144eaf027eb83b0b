"""Neural-state snapshots with a real (tiny) hyena backbone: round trip, keep-N, corrupt and
truncated snapshots skipped with a warning, snapshots that do not fit the backbone refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

import models
from memory_store import SnapshotError, SnapshotStore
from models.base import state_digest

TINY = dict(d_model=32, n_layers=2, filter_len=16, short_kernel=3, window=8, n_heads=2, attn_every=2, mem_every=1, mem_slots=4)


@pytest.fixture(scope="module")
def backbone() -> models.Backbone:
    torch.manual_seed(0)
    return models.build("hyena", **TINY)


def advanced_state(backbone: models.Backbone, n: int) -> models.State:
    tokens = torch.arange(n, dtype=torch.long).remainder(250)[None]
    with torch.no_grad():
        _, state = backbone.forward(tokens, backbone.init_state())
    return state


def test_round_trip_is_bit_exact(tmp_path: Path, backbone: models.Backbone) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    state = advanced_state(backbone, 20)
    rng = torch.Generator().manual_seed(7).get_state()
    store.save(state, [1, 2, 300, 271], {"breath": 12, "turn": 3}, extra={"rng": rng})
    snap = store.load_latest(backbone)
    assert snap is not None
    assert state_digest(snap.state) == state_digest(state) and snap.state.meta == state.meta
    assert snap.context == [1, 2, 300, 271] and snap.clock == {"breath": 12, "turn": 3}
    assert torch.equal(snap.extra["rng"], rng) and snap.seq == 1


async def test_keeps_the_newest_n(tmp_path: Path, backbone: models.Backbone) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    for i in range(5):
        await store.asave(advanced_state(backbone, 4 + i), [i], {"breath": i})
    assert [seq for seq, _ in store.paths()] == [3, 4, 5]
    snap = store.load_latest(backbone)
    assert snap is not None and snap.clock == {"breath": 4} and snap.state.meta.position == 8


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_a_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path: Path, backbone: models.Backbone, damage: str) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    good = advanced_state(backbone, 10)
    store.save(good, [5, 6], {"breath": 1})
    newest = store.save(advanced_state(backbone, 11), [5, 6, 7], {"breath": 2})
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        newest.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(300))
    elif damage == "flip":  # one bit in the tensor data: only the checksum can tell
        newest.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        newest.write_bytes(b"")
    with capture_logs() as logs:
        snap = store.load_latest(backbone)
    assert snap is not None and snap.seq == 1 and state_digest(snap.state) == state_digest(good)
    (w,) = [e for e in logs if e["event"] == "memory.snapshot_skipped"]
    assert w["log_level"] == "warning" and w["seq"] == 2 and w["reason"]


def test_a_snapshot_of_another_backbone_is_skipped(tmp_path: Path, backbone: models.Backbone) -> None:
    store = SnapshotStore(tmp_path)
    store.save(advanced_state(backbone, 5), [], {})
    other = models.build("hyena", **{**TINY, "d_model": 48})
    with capture_logs() as logs:
        assert store.load_latest(other) is None
    assert "config" in logs[0]["reason"]
    assert store.load_latest() is not None  # without a backbone to fit, it reads fine


def test_no_snapshots_and_bad_arguments(tmp_path: Path, backbone: models.Backbone) -> None:
    assert SnapshotStore(tmp_path / "none").load_latest(backbone) is None
    with pytest.raises(SnapshotError):
        SnapshotStore(tmp_path, keep=0)
    with pytest.raises(SnapshotError, match="JSON"):
        SnapshotStore(tmp_path).save(backbone.init_state(), [], {"bad": object()})
