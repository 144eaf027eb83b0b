"""Invariant checks every backbone must pass, as plain functions usable from any pytest.

Plugin authors test their own architecture with the same checks the built-ins pass. One line in a
test module gives one pytest item per check (``test_invariant[causal]``, ``...[state_bounded]``, ...)::

    import models
    from models.testing import invariant_tests

    test_invariant = invariant_tests(lambda: models.build("mine", d_model=32, n_layers=2))

or, all in one test, ``run_all(factory, tmp_path)``. docs/backbones.md walks through a whole plugin.

Each ``check_*`` raises ``AssertionError`` naming what broke, and leaves the backbone it is given
unchanged (``check_overfits`` trains a deep copy). Everything runs in fp32 on the backbone's device.
Pick a small config whose windows / filter lengths / memory sizes are shorter than ``n_tokens`` (64
by default), so that the checks cross every boundary where streaming state is evicted or rolled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import (
    Backbone,
    CheckpointError,
    State,
    StateError,
    load_checkpoint,
    load_state,
    save_checkpoint,
    save_state,
    state_digest,
)

__all__ = [
    "check_bad_inputs",
    "check_causal",
    "check_checkpoint_roundtrip",
    "check_chunked_equals_whole_equals_step",
    "check_overfits",
    "check_pure",
    "check_state_bounded",
    "check_state_roundtrip",
    "CHECKS",
    "invariant_tests",
    "random_tokens",
    "run_all",
    "run_check",
]


def random_tokens(bb: Backbone, batch: int, length: int, seed: int = 0, high: int | None = None) -> Tensor:
    """Seeded random ids in [0, high) (default: the whole vocabulary), LongTensor [batch, length]."""
    g = torch.Generator().manual_seed(seed)
    high = high or bb.config.vocab_size
    return torch.randint(0, high, (batch, length), generator=g).to(bb.device)


@contextmanager
def _eval(bb: Backbone) -> Iterator[None]:
    """Eval mode and no autograd for the duration; restores the training flag afterwards."""
    was_training = bb.training
    bb.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        bb.train(was_training)


def _close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    # A pure rtol fails on values near zero; scale atol by the reference's magnitude instead.
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def _feed(bb: Backbone, tokens: Tensor, state: State, chunks: list[int]) -> tuple[Tensor, State]:
    """Forward ``tokens`` in chunks of the given sizes (the last one takes the rest)."""
    outs, s = [], 0
    for n in [*chunks, tokens.shape[1]]:
        if s >= tokens.shape[1]:
            break
        logits, state = bb.forward(tokens[:, s : s + n], state)
        outs.append(logits)
        s += n
    return torch.cat(outs, dim=1), state


def check_causal(bb: Backbone, n_tokens: int = 48, batch: int = 2, rtol: float = 1e-4) -> None:
    """Logits at t do not depend on tokens after t, and do depend on the token at t."""
    with _eval(bb):
        a = random_tokens(bb, batch, n_tokens, seed=1)
        t = n_tokens // 2
        b = a.clone()
        b[:, t:] = (a[:, t:] + 1 + random_tokens(bb, batch, n_tokens - t, seed=2, high=100)) % bb.config.vocab_size
        la, _ = bb.forward(a, bb.init_state(batch))
        lb, _ = bb.forward(b, bb.init_state(batch))
        _close(lb[:, :t], la[:, :t], rtol, f"logits before position {t} changed when only later tokens changed")
        if torch.allclose(lb[:, t:], la[:, t:], rtol=rtol, atol=rtol):
            raise AssertionError("logits from position t on ignore the tokens at and after t")


def check_chunked_equals_whole_equals_step(
    bb: Backbone, rtol: float = 1e-4, n_tokens: int = 64, batch: int = 2, chunks: tuple[int, ...] = (1, 3, 7, 16)
) -> None:
    """forward(whole) == forward in uneven chunks == step token by token: logits and final state."""
    with _eval(bb):
        tokens = random_tokens(bb, batch, n_tokens, seed=3)
        whole, s_whole = bb.forward(tokens, bb.init_state(batch))
        if whole.shape != (batch, n_tokens, bb.config.vocab_size):
            raise AssertionError(f"forward gave logits {tuple(whole.shape)}, expected {(batch, n_tokens, bb.config.vocab_size)}")
        if whole.dtype != torch.float32 or not torch.isfinite(whole).all():
            raise AssertionError(f"logits must be finite fp32, got {whole.dtype} (finite: {bool(torch.isfinite(whole).all())})")
        chunked, s_chunked = _feed(bb, tokens, bb.init_state(batch), list(chunks))
        _close(chunked, whole, rtol, "chunked forward differs from the whole forward")
        state, steps = bb.init_state(batch), []
        for i in range(n_tokens):
            logits, state = bb.step(tokens[:, i], state)
            steps.append(logits)
        stepped = torch.stack(steps, dim=1)
        _close(stepped, whole, rtol, "step token by token differs from the whole forward")
        for name, ref in s_whole.items():
            _close(s_chunked[name], ref, rtol, f"state[{name!r}] after chunked forward differs")
            _close(state[name], ref, rtol, f"state[{name!r}] after stepping differs")
        for s in (s_whole, s_chunked, state):
            if s.meta.position != n_tokens:
                raise AssertionError(f"state position is {s.meta.position} after {n_tokens} tokens")


def check_pure(bb: Backbone, n_tokens: int = 24) -> None:
    """forward and step leave the state they are given untouched (callers keep old states)."""
    with _eval(bb):
        _, state = bb.forward(random_tokens(bb, 1, n_tokens, seed=4), bb.init_state(1))
        before = state.clone()
        bb.forward(random_tokens(bb, 1, 5, seed=5), state)
        bb.step(random_tokens(bb, 1, 1, seed=6)[:, 0], state)
        for k, v in before.items():
            if not torch.equal(state[k], v):
                raise AssertionError(f"forward/step mutated the given state's {k!r} in place")


def check_state_roundtrip(bb: Backbone, tmp_path: str | Path, n_tokens: int = 40) -> None:
    """save_state/load_state is bit-exact, and continuing from the loaded state gives identical logits."""
    with _eval(bb):
        tokens = random_tokens(bb, 2, n_tokens, seed=7)
        _, state = bb.forward(tokens, bb.init_state(2))
        for k, v in state.items():
            if v.is_floating_point() and v.dtype != torch.float32:
                raise AssertionError(f"state[{k!r}] is {v.dtype}; float state tensors must be fp32")
        path = Path(tmp_path) / "roundtrip.state"
        save_state(state, path)
        loaded = load_state(path, bb)
        if state_digest(loaded) != state_digest(state) or loaded.meta != state.meta:
            raise AssertionError("state differs after save_state/load_state")
        nxt = random_tokens(bb, 2, 9, seed=8)
        la, sa = bb.forward(nxt, state)
        lb, sb = bb.forward(nxt, loaded)
        if not torch.equal(la, lb) or state_digest(sa) != state_digest(sb):
            raise AssertionError("continuing from a loaded state differs from continuing from the original")
        la, _ = bb.step(nxt[:, 0], state)
        lb, _ = bb.step(nxt[:, 0], loaded)
        if not torch.equal(la, lb):
            raise AssertionError("step from a loaded state differs from step from the original")


def check_state_bounded(bb: Backbone, n_tokens: int = 10_000, chunk: int = 500) -> None:
    """The state's size after ``n_tokens`` (fed in chunks) equals its size after 10, and stays finite."""
    with _eval(bb):
        _, short = bb.forward(random_tokens(bb, 1, 10, seed=9), bb.init_state(1))
        state = bb.init_state(1)
        for s in range(0, n_tokens, chunk):
            _, state = bb.forward(random_tokens(bb, 1, min(chunk, n_tokens - s), seed=10 + s), state)
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        short_shapes = {k: (tuple(v.shape), v.dtype) for k, v in short.items()}
        # Tensor bytes, not len(to_bytes()): the serialized header holds the position's digits.
        if state.nbytes() != short.nbytes() or shapes != short_shapes:
            raise AssertionError(
                f"state grows with the stream: {short.nbytes()} bytes {short_shapes} after 10 tokens, "
                f"{state.nbytes()} bytes {shapes} after {n_tokens}"
            )
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise AssertionError(f"state[{k!r}] is not finite after {n_tokens} tokens")
        if state.meta.position != n_tokens:
            raise AssertionError(f"state position {state.meta.position} after {n_tokens} tokens")


def check_overfits(
    bb: Backbone, threshold: float = 0.5, steps: int = 150, lr: float = 3e-3, n_tokens: int = 32, batch: int = 2
) -> float:
    """A deep copy of ``bb`` trained with AdamW on one tiny random batch reaches a loss < ``threshold``
    (mean cross-entropy, nats) within ``steps`` steps. Returns the best loss seen."""
    model = copy.deepcopy(bb)
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    tokens = random_tokens(bb, batch, n_tokens + 1, seed=11, high=256)
    first = best = float("inf")
    for i in range(steps):
        logits, _ = model(tokens[:, :-1], model.init_state(batch))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise AssertionError(f"loss became {float(loss)} at step {i}")
        value = loss.item()
        first = value if i == 0 else first
        best = min(best, value)
        if best < threshold:
            return best
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    raise AssertionError(f"did not overfit a tiny batch: loss {first:.3f} -> best {best:.3f} after {steps} steps (threshold {threshold})")


def _expect(exc: type[Exception], what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc:
        return
    except Exception as other:  # the wrong error type is as much a failure as no error
        raise AssertionError(f"{what}: raised {type(other).__name__}: {other}, expected {exc.__name__}") from other
    raise AssertionError(f"{what}: no {exc.__name__} raised")


def check_bad_inputs(bb: Backbone, tmp_path: str | Path) -> None:
    """States from another architecture or config, corrupt state files and bad checkpoints fail with
    StateError / CheckpointError, never with an arbitrary exception or silently."""
    tmp = Path(tmp_path)
    tok = random_tokens(bb, 1, 4, seed=12)
    good = bb.init_state(1)
    other_arch = State(good, dataclasses.replace(good.meta, architecture=f"not-{bb.name}"))
    other_cfg = State(good, dataclasses.replace(good.meta, config_hash="0" * 16))
    newer = State(good, dataclasses.replace(good.meta, format_version=good.meta.format_version + 1))
    with _eval(bb):
        for label, st in [("another architecture", other_arch), ("another config", other_cfg), ("a newer format", newer)]:
            _expect(StateError, f"forward on a state from {label}", lambda st=st: bb.forward(tok, st))
            _expect(StateError, f"step on a state from {label}", lambda st=st: bb.step(tok[:, 0], st))
            save_state(st, tmp / "bad.state")
            _expect(StateError, f"load_state of a state from {label}", lambda: load_state(tmp / "bad.state", bb))
        _expect(StateError, "forward on a plain dict", lambda: bb.forward(tok, dict(good)))  # type: ignore[arg-type]
        (tmp / "garbage.state").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
        _expect(StateError, "load_state of garbage", lambda: load_state(tmp / "garbage.state", bb))
        _expect(StateError, "load_state of a missing file", lambda: load_state(tmp / "missing.state", bb))
        if good:  # keys or shapes that do not fit, under valid metadata
            name = sorted(good)[0]
            fewer = State({k: v for k, v in good.items() if k != name}, good.meta)
            save_state(fewer, tmp / "fewer.state")
            _expect(StateError, "load_state of a state missing a tensor", lambda: load_state(tmp / "fewer.state", bb))
            grown = State({**good, name: torch.zeros(*good[name].shape, 3)}, good.meta)
            save_state(grown, tmp / "grown.state")
            _expect(StateError, "load_state of a state with a wrong shape", lambda: load_state(tmp / "grown.state", bb))

    _expect(CheckpointError, "load_checkpoint of a missing directory", lambda: load_checkpoint(tmp / "nope"))
    ck = tmp / "ckpt"
    save_checkpoint(bb, ck)
    _expect(CheckpointError, "load_checkpoint expecting another architecture", lambda: load_checkpoint(ck, expect=f"not-{bb.name}"))
    meta = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "no_such_key": 1}}))
    _expect(CheckpointError, "load_checkpoint with an unknown config key", lambda: load_checkpoint(ck))
    (ck / "config.json").write_text(json.dumps({**meta, "architecture": "no-such-architecture"}))
    _expect(CheckpointError, "load_checkpoint of an unknown architecture", lambda: load_checkpoint(ck))
    (ck / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "vocab_size": meta["config"]["vocab_size"] + 8}}))
    _expect(CheckpointError, "load_checkpoint whose weights do not fit its config", lambda: load_checkpoint(ck))
    (ck / "config.json").write_text("{ not json")
    _expect(CheckpointError, "load_checkpoint with a garbage config.json", lambda: load_checkpoint(ck))
    (ck / "config.json").write_text(json.dumps(meta))
    (ck / "model.safetensors").write_bytes(b"garbage")
    _expect(CheckpointError, "load_checkpoint with garbage weights", lambda: load_checkpoint(ck))
    (ck / "model.safetensors").unlink()
    _expect(CheckpointError, "load_checkpoint without weights", lambda: load_checkpoint(ck))


def check_checkpoint_roundtrip(bb: Backbone, tmp_path: str | Path) -> None:
    """save_checkpoint then load_checkpoint rebuilds an identical model (same config, same logits)."""
    ck = Path(tmp_path) / "roundtrip-ckpt"
    save_checkpoint(bb, ck, step=7)
    loaded = load_checkpoint(ck, expect=bb.name)
    if type(loaded) is not type(bb) or loaded.config != bb.config:
        raise AssertionError(f"checkpoint rebuilt {type(loaded).__name__}({loaded.config}), expected {bb.config}")
    loaded.to(bb.device)
    with _eval(bb):
        tokens = random_tokens(bb, 1, 16, seed=13)
        la, _ = bb.forward(tokens, bb.init_state(1))
        lb, _ = loaded.forward(tokens, loaded.init_state(1))
    if not torch.equal(la, lb):
        raise AssertionError("a model loaded from its checkpoint gives other logits")


# name -> check(backbone, tmp_dir, overfit_threshold, overfit_steps): the order run_all runs them in.
CHECKS: dict[str, Callable[[Backbone, Path, float, int], object]] = {
    "causal": lambda bb, tmp, th, n: check_causal(bb),
    "chunked_equals_whole_equals_step": lambda bb, tmp, th, n: check_chunked_equals_whole_equals_step(bb),
    "pure": lambda bb, tmp, th, n: check_pure(bb),
    "state_roundtrip": lambda bb, tmp, th, n: check_state_roundtrip(bb, tmp),
    "state_bounded": lambda bb, tmp, th, n: check_state_bounded(bb),
    "bad_inputs": lambda bb, tmp, th, n: check_bad_inputs(bb, tmp),
    "checkpoint_roundtrip": lambda bb, tmp, th, n: check_checkpoint_roundtrip(bb, tmp),
    "overfits": lambda bb, tmp, th, n: check_overfits(bb, threshold=th, steps=n),
}


def run_check(name: str, bb: Backbone, tmp_path: str | Path, overfit_threshold: float = 0.5, overfit_steps: int = 150) -> None:
    """Run the check ``name`` (a key of ``CHECKS``) on ``bb``, using ``tmp_path`` for its files."""
    if name not in CHECKS:
        raise KeyError(f"no invariant check {name!r}; known: {', '.join(CHECKS)}")
    tmp = Path(tmp_path) / name
    tmp.mkdir(parents=True, exist_ok=True)
    CHECKS[name](bb, tmp, overfit_threshold, overfit_steps)


def run_all(factory: Callable[[], Backbone], tmp_path: str | Path, overfit_threshold: float = 0.5, overfit_steps: int = 150) -> None:
    """Every check above, each on a fresh backbone from ``factory`` (a small config, fp32)."""
    for name in CHECKS:
        run_check(name, factory(), tmp_path, overfit_threshold, overfit_steps)


def invariant_tests(
    factory: Callable[[], Backbone],
    skip: Collection[str] = (),
    overfit_threshold: float = 0.5,
    overfit_steps: int = 150,
) -> Callable[..., None]:
    """A pytest test function, parametrized over every check in ``CHECKS`` but ``skip``: bind it to a
    ``test_*`` name in a test module and pytest collects one item per check, each on a fresh backbone
    from ``factory``. ``skip`` is for checks an architecture cannot meet by design (say so in a comment).
    Needs pytest (imported here, not by the rest of this module)."""
    import pytest

    unknown = sorted(set(skip) - set(CHECKS))
    if unknown:
        raise KeyError(f"skip names unknown checks {unknown}; known: {', '.join(CHECKS)}")
    names = [n for n in CHECKS if n not in skip]

    @pytest.mark.parametrize("check", names)
    def test_invariant(check: str, tmp_path: Path) -> None:
        run_check(check, factory(), tmp_path, overfit_threshold, overfit_steps)

    return test_invariant
