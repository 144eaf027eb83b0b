"""Neural-state snapshots: the backbone ``State``, the short-term context and the clock's position.

The daemon snapshots at every PAUSE and on shutdown and restores the newest valid snapshot at start,
so ``agentd stop`` + ``agentd start`` resumes bit-identically and ``kill -9`` loses at most the work
since the last PAUSE.

One file per snapshot, ``<dir>/state-<seq>.safetensors`` (seq grows by one each save), written
atomically (temp file in the same directory, fsync, rename, fsync the directory). Tensors:

    state/<name>    every tensor of the backbone State
    context         int64 [n], the short-term context token ids
    extra/<name>    optional tensors the daemon adds (a sampler's RNG state, ...)

The safetensors header metadata holds ``format`` (this module's version), ``state_meta`` (the
State's architecture, config hash, format version, position), ``clock`` (the daemon's small JSON
dict: breath, turn, ...), ``created`` and ``checksum``: sha256 over the other metadata and every
tensor's name, dtype, shape and bytes. A truncated, garbage or checksum-failing file is skipped with
a ``memory.snapshot_skipped`` warning and the previous one is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from memory_store.errors import SnapshotError
from models.base import Backbone, ModelError, State, StateMeta, atomic_write_bytes

log = structlog.get_logger("memory_store")

SNAPSHOT_FORMAT = 1
_NAME = re.compile(r"^state-(\d{12})\.safetensors$")


@dataclass(frozen=True)
class Snapshot:
    state: State
    context: list[int]
    clock: dict[str, Any]
    extra: dict[str, Tensor] = field(default_factory=dict)
    created: float = 0.0
    seq: int = 0
    path: Path | None = None


def _checksum(meta: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(state: State, context: list[int], clock: Mapping[str, Any], extra: Mapping[str, Tensor] | None = None,
           created: float | None = None) -> bytes:
    """A snapshot as bytes (see the module docstring for the layout)."""
    tensors: dict[str, Tensor] = {f"state/{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    tensors["context"] = torch.tensor(list(context), dtype=torch.int64)
    for k, v in (extra or {}).items():
        tensors[f"extra/{k}"] = v.detach().contiguous().cpu()
    try:
        clock_json = json.dumps(dict(clock), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"clock must be a small JSON object: {exc}") from exc
    meta = {
        "format": str(SNAPSHOT_FORMAT),
        "state_meta": json.dumps(asdict(state.meta), sort_keys=True),
        "clock": clock_json,
        "created": repr(time.time() if created is None else created),
    }
    meta["checksum"] = _checksum(meta, tensors)
    return st_save(tensors, metadata=meta)


def decode(data: bytes) -> Snapshot:
    """Parse and verify snapshot bytes; raises SnapshotError naming what is wrong."""
    if len(data) < 8:
        raise SnapshotError("truncated (no header)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise SnapshotError("truncated header")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != str(SNAPSHOT_FORMAT):
        raise SnapshotError(f"not a format-{SNAPSHOT_FORMAT} agentd snapshot")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"unreadable tensors: {exc}") from exc
    if _checksum(meta, tensors) != meta.get("checksum"):
        raise SnapshotError("checksum mismatch")
    try:
        sm = StateMeta(**json.loads(meta["state_meta"]))
        clock = json.loads(meta["clock"])
        created = float(meta["created"])
        context = tensors.pop("context").tolist()
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"bad metadata: {exc}") from exc
    state = State({k[6:]: v for k, v in tensors.items() if k.startswith("state/")}, sm)
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
    return Snapshot(state, context, clock, extra, created)


def check_fits(state: State, backbone: Backbone) -> None:
    """Raise SnapshotError unless ``state`` belongs to ``backbone``: architecture, config hash,
    state format, tensor names, shapes and dtypes."""
    try:
        backbone.check_state(state)
    except ModelError as exc:
        raise SnapshotError(str(exc)) from exc
    template = backbone.init_state(next((int(t.shape[0]) for t in state.values() if t.dim() > 0), 1))
    if set(template) != set(state):
        raise SnapshotError(f"state has tensors {sorted(state)}, the backbone expects {sorted(template)}")
    for k, t in template.items():
        if t.shape != state[k].shape or t.dtype != state[k].dtype:
            raise SnapshotError(f"state tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, expected {tuple(t.shape)} {t.dtype}")


class SnapshotStore:
    """The snapshot directory: ``save`` a new snapshot, keep the newest ``keep``, ``load_latest``."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise SnapshotError("keep must be >= 1")
        self.dir = Path(directory)
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        """(seq, path) of every snapshot file, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, state: State, context: list[int], clock: Mapping[str, Any], extra: Mapping[str, Tensor] | None = None) -> Path:
        """Write a snapshot atomically, then delete all but the newest ``keep``."""
        return self.write(encode(state, context, clock, extra))

    async def asave(self, state: State, context: list[int], clock: Mapping[str, Any], extra: Mapping[str, Tensor] | None = None) -> Path:
        """``save`` with the file I/O (and its fsyncs) off the event loop. The bytes are built on
        the caller's thread first, so the snapshot is of the state as it is at the call."""
        data = encode(state, context, clock, extra)
        return await asyncio.to_thread(self.write, data)

    def write(self, data: bytes) -> Path:
        existing = self.paths()
        seq = existing[-1][0] + 1 if existing else 1
        path = self.dir / f"state-{seq:012d}.safetensors"
        t0 = time.perf_counter()
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise SnapshotError(f"cannot write snapshot {path}: {exc}") from exc
        removed = self._prune()
        log.info("memory.snapshot_saved", path=str(path), seq=seq, bytes=len(data), removed=removed,
                 seconds=round(time.perf_counter() - t0, 4))
        return path

    def _prune(self) -> int:
        removed = 0
        for _, p in self.paths()[: -self.keep]:
            try:
                p.unlink()
                removed += 1
            except OSError as exc:
                log.warning("memory.snapshot_prune_failed", path=str(p), error=str(exc))
        # Temp files of a write a crash interrupted (atomic_write_bytes names them .<name>.*.tmp).
        for p in self.dir.glob(".state-*.tmp"):
            p.unlink(missing_ok=True)
        return removed

    def load_latest(self, backbone: Backbone | None = None) -> Snapshot | None:
        """The newest snapshot that reads, verifies and (with ``backbone``) fits it; each one
        skipped on the way is logged with a warning. None when there is no usable snapshot."""
        for seq, path in reversed(self.paths()):
            try:
                snap = decode(path.read_bytes())
                if backbone is not None:
                    check_fits(snap.state, backbone)
            except (SnapshotError, OSError) as exc:
                log.warning("memory.snapshot_skipped", path=str(path), seq=seq, reason=str(exc))
                continue
            snap = Snapshot(snap.state, snap.context, snap.clock, snap.extra, snap.created, seq, path)
            log.info("memory.snapshot_loaded", path=str(path), seq=seq, position=snap.state.meta.position,
                     context_tokens=len(snap.context), clock=snap.clock)
            return snap
        return None
