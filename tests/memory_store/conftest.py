"""Shared fixtures: one real all-MiniLM-L6-v2 for the whole session (loading it takes seconds)."""

from __future__ import annotations

import pytest
from memhelpers import HashEmbedder

from memory_store import Embedder, default_embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()
