"""The FAISS side of long-term memory: an id-mapped inner-product index and its snapshot file.

Two kinds, both ``IndexIDMap`` so FAISS ids are SQLite ids:

- ``flat``: ``IndexFlatIP``, exact; supports removal.
- ``hnsw``: ``IndexHNSWFlat`` (inner product), for large stores. HNSW cannot remove vectors, so a
  deleted id stays in the graph as *stale*: searches skip it and over-fetch to make up, and the
  store rebuilds the index once too much of it is stale.

Snapshot file layout (never pickle; nothing in it is executed)::

    MAGIC (8 bytes) | header length (u32 LE) | header JSON | sha256(payload) (32 bytes) | payload

The header names the kind, embedding model, dimension, watermark (highest memory id held) and
ntotal; the payload is ``faiss.serialize_index``. The checksum is verified before FAISS sees a
byte, so a truncated or garbage file is reported as corrupt instead of reaching FAISS's reader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any, Literal

import faiss
import numpy as np

MAGIC = b"AGMIDX\x00\x01"
FORMAT_VERSION = 1
IndexKind = Literal["flat", "hnsw"]


def set_faiss_threads(n: int) -> None:
    """FAISS's OpenMP threads for the calling thread (an OpenMP setting is per thread); 0 leaves
    the default. One thread is the fast choice on a shared CPU: FAISS's idle OpenMP threads spin
    after each call and slowed the embedding model's next call by half in our measurements."""
    if n > 0 and faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


class IndexFileError(Exception):
    """A snapshot that cannot be used (truncated, garbage, wrong format). Internal to the
    package: the store turns it into a rebuild with a warning."""


@dataclass(frozen=True)
class IndexHeader:
    kind: str
    model: str
    dim: int
    watermark: int  # highest memory id the snapshot holds (0 = none)
    ntotal: int
    store_id: str = ""  # the store it belongs to: a file copied from another store is not used
    format: int = FORMAT_VERSION


@dataclass(frozen=True)
class HnswParams:
    m: int = 32
    ef_construction: int = 64
    ef_search: int = 64


class VectorIndex:
    """A FAISS index over unit vectors with int64 ids. Not thread-safe: the store locks around it."""

    def __init__(self, dim: int, kind: IndexKind = "flat", hnsw: HnswParams | None = None, *, _index: Any = None) -> None:
        self.dim = dim
        self.kind: IndexKind = kind
        self.hnsw = hnsw or HnswParams()
        self.stale: set[int] = set()
        if _index is not None:
            self._index = _index
        elif kind == "flat":
            self._index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        else:
            inner = faiss.IndexHNSWFlat(dim, self.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.hnsw.ef_construction
            self._index = faiss.IndexIDMap(inner)
        self._set_ef(self.hnsw.ef_search)

    # -- contents --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors in the index, stale ones included."""
        return int(self._index.ntotal)

    @property
    def live(self) -> int:
        return self.ntotal - len(self.stale)

    def ids(self) -> np.ndarray:
        """Every id in the index (stale ones included), in insertion order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors are {vectors.shape}, expected ({len(ids)}, {self.dim})")
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: list[int] | np.ndarray) -> None:
        """Drop ``ids``: removed from a flat index, marked stale in an HNSW one."""
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr) == 0:
            return
        if self.kind == "flat":
            self._index.remove_ids(arr)
        else:
            self.stale.update(int(i) for i in arr)

    def stale_fraction(self) -> float:
        return len(self.stale) / self.ntotal if self.ntotal else 0.0

    # -- search ----------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top ``k`` live (id, inner product) for one query vector, best first."""
        if k <= 0 or self.live <= 0:
            return []
        fetch = min(self.ntotal, k + len(self.stale))
        if self.kind == "hnsw":
            self._set_ef(max(self.hnsw.ef_search, fetch))
        scores, ids = self._index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim), fetch)
        out: list[tuple[int, float]] = []
        for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True):
            if i < 0 or i in self.stale:  # -1: HNSW found fewer than asked
                continue
            out.append((i, float(s)))
            if len(out) == k:
                break
        return out

    def _set_ef(self, ef: int) -> None:
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = int(ef)

    # -- snapshot file ---------------------------------------------------------------------------
    def to_bytes(self, model: str, watermark: int, store_id: str = "") -> bytes:
        payload = faiss.serialize_index(self._index).tobytes()
        header = json.dumps(asdict(IndexHeader(self.kind, model, self.dim, watermark, self.ntotal, store_id)), sort_keys=True).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + hashlib.sha256(payload).digest() + payload

    @classmethod
    def from_bytes(cls, data: bytes, hnsw: HnswParams | None = None) -> tuple[VectorIndex, IndexHeader]:
        if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
            raise IndexFileError("not an agentd index file (bad magic)")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if n > 65536 or len(data) < start + n + 32:
            raise IndexFileError("truncated header")
        try:
            raw = json.loads(data[start : start + n])
            header = IndexHeader(**raw)
        except (ValueError, TypeError) as exc:
            raise IndexFileError(f"bad header: {exc}") from exc
        if header.format != FORMAT_VERSION or header.kind not in ("flat", "hnsw"):
            raise IndexFileError(f"unsupported index format {header.format} / kind {header.kind!r}")
        digest = data[start + n : start + n + 32]
        payload = data[start + n + 32 :]
        if hashlib.sha256(payload).digest() != digest:
            raise IndexFileError("checksum mismatch (truncated or damaged)")
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexFileError(f"FAISS cannot read it: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap) or index.d != header.dim or index.ntotal != header.ntotal:
            raise IndexFileError("payload does not match its header")
        return cls(header.dim, header.kind, hnsw, _index=index), header  # type: ignore[arg-type]

    @classmethod
    def build(cls, dim: int, kind: IndexKind, ids: np.ndarray, vectors: np.ndarray, hnsw: HnswParams | None = None) -> VectorIndex:
        index = cls(dim, kind, hnsw)
        index.add(ids, vectors)
        return index
