"""Fixtures for the model tests: tiny transformers models built locally once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinylm


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chain_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.chain_llama(tmp_path_factory.mktemp("chain-llama"))


@pytest.fixture(scope="session")
def loop_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.chain_llama(tmp_path_factory.mktemp("loop-llama"), reply=tinylm.LOOP, loop=True)
