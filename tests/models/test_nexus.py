"""nexus specifics the shared invariants do not reach: recall from the memory long after the window
has moved on (and the window-only baseline failing it), long streams through every memory block
boundary, the lexical vote and fusion gates, the state layout and the config."""

from __future__ import annotations

import pytest
import torch

import models
from models import testing
from models.nexus import PRESETS, Nexus, NexusConfig

TINY = dict(
    d_model=32, n_layers=2, n_heads=2, window=16, rsm_every=1, mem_block=8, sem_slots=16, sem_topk=4, sem_key_dim=8,
    sem_value_dim=16, sem_gate_bias=0.0, lex_slots=256, lex_ways=8, lex_ngram=8, lex_lookahead=4,
)
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _build(**kw: object) -> Nexus:
    torch.manual_seed(0)
    bb = models.build("nexus", **{**TINY, **kw})
    assert isinstance(bb, Nexus)
    return bb


def _answer(bb: Nexus, text: bytes, prompt: bytes, n: int) -> bytes:
    """Feed ``text`` in chunks, then ``prompt``, then decode ``n`` tokens greedily with ``step``."""
    with torch.inference_mode():
        state = bb.init_state(1)
        tokens = torch.tensor(list(text + prompt))[None]
        for s in range(0, tokens.shape[1], 500):
            logits, state = bb.forward(tokens[:, s : s + 500], state)
        out = []
        nxt = logits[:, -1].argmax(-1)
        for _ in range(n):
            out.append(int(nxt))
            logits, state = bb.step(nxt, state)
            nxt = logits.argmax(-1)
    return bytes(t if t < 256 else ord("?") for t in out)


def test_needle_recalled_long_after_it_left_the_window() -> None:
    # An untrained model: the lexical lane's vote alone carries the value across 9k tokens, over
    # 560 times the attention window.
    text = b"Note: the vault code for unit K7-QX is 8675309. " + FILLER * 100
    prompt = b"the vault code for unit K7-QX is "
    assert len(text) > 500 * TINY["window"]  # type: ignore[operator]
    assert _answer(_build(), text, prompt, 7) == b"8675309"
    # The window-only baseline cannot: nothing of the needle is left in its state.
    assert _answer(_build(**PRESETS["window_only"]), text, prompt, 7) != b"8675309"


def test_long_stream_crosses_every_memory_boundary() -> None:
    bb = _build()
    # 300 tokens: dozens of memory blocks landing inside chunks, at chunk edges and between steps.
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=300, chunks=(1, 15, 17, 100, 33))
    with torch.no_grad():
        _, state = bb.forward(testing.random_tokens(bb, 1, 300, seed=3), bb.init_state(1))
    assert (state["r0.occ"] > 0).sum() > 4  # the semantic lanes did write


def test_default_config_is_streaming_exact() -> None:
    torch.manual_seed(0)
    bb = models.build("nexus")
    # 300 tokens: one full 256-token attention window and two memory blocks of 128 land.
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=300, batch=1, chunks=(5, 128, 100))


def test_lexical_vote_only_where_the_lane_recalls() -> None:
    bb = _build()
    text = torch.tensor(list(b"zx-41 q" * 6))[None]
    with torch.no_grad():
        logits, state = bb.forward(text, bb.init_state(1))
        lex, _ = bb.lex(text, {k[4:]: v for k, v in bb.init_state(1).items() if k.startswith("lex.")}, 0)
        plain = logits.clone()
        bb.copy_gain.zero_()
        muted, _ = bb.forward(text, bb.init_state(1))
    hit = lex[0] >= 0
    assert hit.any() and (~hit).any()
    diff = plain[0] - muted[0]
    torch.testing.assert_close(diff[~hit], torch.zeros_like(diff[~hit]))
    rows = diff[hit]
    assert torch.allclose(rows.max(-1).values, torch.full((int(hit.sum()),), NexusConfig().copy_gain))
    assert torch.equal(rows.argmax(-1), lex[0][hit])


def test_memory_parameters_are_trained() -> None:
    bb = _build().train()
    # Random bytes, then a repeat of them: the semantic lanes write, and the lexical lane recalls.
    tokens = testing.random_tokens(bb, 1, 24, seed=5, high=256).repeat(1, 2)
    logits, state = bb(tokens, bb.init_state(1))
    assert (state["r0.occ"] > 0).any()
    logits.logsumexp(-1).mean().backward()
    mem = bb.blocks["r0"]
    assert bb.copy_gain.grad is not None and bb.copy_gain.grad != 0
    assert mem.beta.grad is not None and mem.sem.proj.weight.grad.abs().sum() > 0
    assert mem.lex_embed.weight.grad.abs().sum() > 0  # the lexical read is fused into the stream


def test_state_layout() -> None:
    bb = _build()
    state = bb.init_state(3)
    assert state["b0.k"].shape == (3, 2, 16, 16)
    assert state["r0.mk"].shape == (3, 16, 8) and state["r0.mv"].shape == (3, 16, 16)
    assert state["r0.pend"].shape == (3, 8, 8 + 16 + 1)
    assert state["lex.slots"].shape == (3, 256, 3) and state["lex.pend"].shape == (3, 8, 3)
    for k, v in state.items():
        assert v.dtype == (torch.long if k.startswith("lex.") or k.endswith(".pslot") else torch.float32), k
    baseline = _build(**PRESETS["window_only"]).init_state(1)
    assert sorted(baseline) == ["b0.k", "b0.v", "b1.k", "b1.v"]


def test_default_layer_plan_and_size() -> None:
    bb = models.build("nexus")
    assert list(bb.blocks) == ["b0", "b1", "b2", "r2", "b3", "b4", "b5", "r5"]
    assert list(models.build("nexus", d_model=64, n_layers=2).blocks) == ["b0", "b1", "r1"]  # still one memory layer
    assert 2e6 < models.count_parameters(bb) < 4e6
    assert bb.init_state(1).nbytes() < 16 * 2**20  # a state snapshot stays small


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name: str) -> None:
    bb = models.build("nexus", **PRESETS[name])
    with torch.no_grad():
        logits, state = bb.forward(testing.random_tokens(bb, 1, 20), bb.init_state(1))
    assert torch.isfinite(logits).all() and state.meta.position == 20


@pytest.mark.parametrize(
    "bad",
    [
        dict(mem_block=32),  # > window: the window would not cover the write lag
        dict(d_model=30, n_heads=4),
        dict(n_heads=32),  # head size 1: RoPE needs it even
        dict(sem_slots=100),
        dict(lex_slots=100, lex_ways=8),
        dict(lex_ngram=0),
        dict(sem_key_dim=0),
        dict(rsm_every=-1),
        dict(no_such=1),
    ],
)
def test_bad_config(bad: dict[str, int]) -> None:
    with pytest.raises(models.BackboneConfigError):
        models.build("nexus", **{**TINY, **bad})
