"""memory_store: what agentd was told, and the state its model was in, survive restarts and crashes.

- ``MemoryStore`` / ``LongTermMemory`` (longterm.py): SQLite (WAL) as the truth, a FAISS index as a
  rebuildable cache, sentence-transformers embeddings from the bundled all-MiniLM-L6-v2.
- ``SnapshotStore`` (snapshots.py): atomic neural-state snapshots, newest valid one restored.
- ``MemoryStoreError``: the root of every error this package raises.
"""

from memory_store.embedding import Embedder, SentenceTransformerEmbedder, default_embedder
from memory_store.errors import (
    EmbeddingError,
    ImportFormatError,
    InvalidMemoryError,
    MemoryStoreError,
    SchemaError,
    SnapshotError,
    StorageError,
    StoreClosedError,
)
from memory_store.longterm import (
    Hit,
    LongTermMemory,
    Memory,
    MemoryStore,
    NewMemory,
    normalise_text,
    read_jsonl,
)
from memory_store.schema import SCHEMA_VERSION
from memory_store.snapshots import Snapshot, SnapshotStore

__all__ = [
    "SCHEMA_VERSION",
    "Embedder",
    "EmbeddingError",
    "Hit",
    "ImportFormatError",
    "InvalidMemoryError",
    "LongTermMemory",
    "Memory",
    "MemoryStore",
    "MemoryStoreError",
    "NewMemory",
    "SchemaError",
    "SentenceTransformerEmbedder",
    "Snapshot",
    "SnapshotError",
    "SnapshotStore",
    "StorageError",
    "StoreClosedError",
    "default_embedder",
    "normalise_text",
    "read_jsonl",
]
