"""The shared backbone invariants (models.testing) on every built-in architecture, and proof that the
checks catch broken backbones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import models
from models import testing
from models.hyena import Hyena, HyenaConfig

# Small configs, one per built-in architecture, that run the checks in seconds on a CPU. Windows,
# filter lengths and memory sizes are kept below the checks' 64 tokens so that every eviction path
# runs. Other architectures add their own small config here; only architectures that are present
# (``models.available()``) are tested, none is skipped.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "hyena": dict(
        d_model=32, n_layers=2, filter_len=16, short_kernel=3, window=8, n_heads=2, attn_every=2, mem_every=1, mem_slots=4
    ),
    "nexus": dict(
        d_model=32, n_layers=2, n_heads=2, window=8, rsm_every=1, mem_block=8, sem_slots=16, sem_topk=4, sem_key_dim=8,
        sem_value_dim=16, sem_gate_bias=0.0, lex_slots=64, lex_ways=4, lex_ngram=3, lex_lookahead=2,
    ),
    "astarte": dict(d_model=32, n_layers=2, n_heads=2, state_dim=16),
    "spiral": dict(d_model=32, n_layers=2, n_heads=2, max_hop=8, tower_slots=3, paint_every=4),
    "agiformer": dict(d_model=32, n_layers=2, n_heads=2, window=4, d_local=8),  # window: 4 latents = 16 bytes
    # A tiny random GPT-2 built and saved locally (tests/models/tinylm.py); ``path`` is filled in
    # by the factory from the session's fixture.
    "hf": dict(window=16, keep=8),
}

ARCHS = [name for name in SMALL_CONFIGS if name in models.available()]


@pytest.fixture(params=ARCHS)
def factory(request: pytest.FixtureRequest) -> Callable[[], models.Backbone]:
    name = request.param
    overrides = dict(SMALL_CONFIGS[name])
    if name == "hf":
        overrides["path"] = str(request.getfixturevalue("tiny_gpt2_dir"))

    def make() -> models.Backbone:
        torch.manual_seed(0)
        return models.build(name, **overrides)

    return make


def test_hyena_is_tested() -> None:
    assert "hyena" in ARCHS


def test_causal(factory: Callable[[], models.Backbone]) -> None:
    testing.check_causal(factory())


def test_chunked_equals_whole_equals_step(factory: Callable[[], models.Backbone]) -> None:
    testing.check_chunked_equals_whole_equals_step(factory(), rtol=1e-4)


def test_pure(factory: Callable[[], models.Backbone]) -> None:
    testing.check_pure(factory())


def test_state_roundtrip(factory: Callable[[], models.Backbone], tmp_path: Path) -> None:
    testing.check_state_roundtrip(factory(), tmp_path)


def test_state_bounded(factory: Callable[[], models.Backbone]) -> None:
    testing.check_state_bounded(factory())


def test_overfits(factory: Callable[[], models.Backbone]) -> None:
    testing.check_overfits(factory(), threshold=0.5, steps=150)


def test_bad_inputs(factory: Callable[[], models.Backbone], tmp_path: Path) -> None:
    testing.check_bad_inputs(factory(), tmp_path)


def test_checkpoint_roundtrip(factory: Callable[[], models.Backbone], tmp_path: Path) -> None:
    testing.check_checkpoint_roundtrip(factory(), tmp_path)


# -- the checks fail on broken backbones ------------------------------------------------------------
# Unregistered subclasses of a tiny hyena, each breaking one invariant.
TINY = HyenaConfig(**SMALL_CONFIGS["hyena"])


class Leaky(Hyena):
    """Peeks at the next token."""

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits, new = super()._forward(tokens, tensors, pos)
        peek = torch.nn.functional.one_hot(tokens[:, 1:], logits.shape[-1]).float()
        return torch.cat([logits[:, :-1] + peek, logits[:, -1:]], dim=1), new


class Forgetful(Hyena):
    """Drops the state it is given: chunked forward differs from the whole one."""

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        return super()._forward(tokens, self._init_tensors(tokens.shape[0]), pos)


class Growing(Hyena):
    """Keeps a log of every token in its state."""

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        return {**super()._init_tensors(batch_size), "log": torch.zeros(batch_size, 0)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        log = tensors.pop("log")
        logits, new = super()._forward(tokens, tensors, pos)
        return logits, {**new, "log": torch.cat([log, tokens.float()], dim=1)}


class Mutating(Hyena):
    """Writes into the state it was given."""

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits, new = super()._forward(tokens, tensors, pos)
        for k, v in new.items():
            tensors[k].copy_(v)
        return logits, tensors


class Lenient(Hyena):
    """Accepts any state."""

    def check_state(self, state: Any) -> None:
        return None


class Frozen(Hyena):
    """Has nothing to learn: logits depend on no parameter."""

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits, new = super()._forward(tokens, tensors, pos)
        return logits.detach().requires_grad_(), new


@pytest.mark.parametrize(
    "cls, check",
    [
        (Leaky, testing.check_causal),
        (Forgetful, testing.check_chunked_equals_whole_equals_step),
        (Growing, lambda bb: testing.check_state_bounded(bb, n_tokens=200, chunk=50)),
        (Mutating, testing.check_pure),
        (Lenient, lambda bb: testing.check_bad_inputs(bb, bb.tmp)),
        (Frozen, testing.check_overfits),
    ],
    ids=["causal", "chunked", "bounded", "pure", "bad_inputs", "overfits"],
)
def test_checks_catch_broken_backbones(cls: type[Hyena], check: Callable[[Any], object], tmp_path: Path) -> None:
    bb = cls(TINY).eval()
    bb.tmp = tmp_path  # type: ignore[attr-defined]
    with pytest.raises(AssertionError) as err:
        check(bb)
    assert str(err.value)  # the check says what broke
