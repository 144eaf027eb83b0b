"""The one exception root of ``memory_store``; SQLite, FAISS, safetensors and OS errors are
converted to these at the package boundary so callers catch a single family."""

from __future__ import annotations


class MemoryStoreError(Exception):
    """Root of every error raised by ``memory_store``."""


class StoreClosedError(MemoryStoreError):
    """The store was used outside its ``async with`` block (or after ``close``)."""


class InvalidMemoryError(MemoryStoreError, ValueError):
    """A memory that cannot be stored: empty text, metadata that is not a JSON object, ..."""


class SchemaError(MemoryStoreError):
    """The database was written by a newer agentd, or a migration failed."""


class EmbeddingError(MemoryStoreError):
    """The embedding model could not be loaded or failed to embed."""


class StorageError(MemoryStoreError):
    """SQLite or the file system failed underneath the store."""


class SnapshotError(MemoryStoreError):
    """A neural-state snapshot could not be written, or none could be read."""


class ImportFormatError(MemoryStoreError, ValueError):
    """A JSON Lines import file with a malformed line (the message names the line)."""
