"""spiral (Spiralformer) specifics the shared invariants do not reach: the hop pattern and its bounded
cache, silence, breath gating, the phase and charge as inputs, Soma's latch, TowerMemory's paintings and
recall by resonance, and streams dense with control tokens through every chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models import spiral, testing
from models.layers import rms
from models.spiral import PHASES, SpiralAttention, SpiralConfig, set_breath
from models.tokenizer import ID

TINY = dict(d_model=32, n_layers=2, n_heads=2, max_hop=8, tower_slots=3, paint_every=4)
CONTROLS = [ID[n] for n in ("OBS", "END_OBS", "MEM", "END_MEM", "SENSE", "END_SENSE", "THINK", "SPEAK", "WAIT", "PAD")]


def _control_stream(batch: int, n: int, seed: int) -> torch.Tensor:
    """Bytes with a control token about every third position: every phase, Soma latch and silence path runs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, n), generator=g)
    pick = torch.rand(batch, n, generator=g) < 0.35
    controls = torch.tensor(CONTROLS)[torch.randint(0, len(CONTROLS), (batch, n), generator=g)]
    return torch.where(pick, controls, tokens)


def _logits_at(bb: models.Backbone, tokens: torch.Tensor, t: int) -> torch.Tensor:
    with torch.no_grad():
        return bb.forward(tokens, bb.init_state(tokens.shape[0]))[0][:, t]


@pytest.mark.parametrize("chunks", [(1, 5, 11, 40), (64,), (3, 3, 3)])
def test_control_dense_streams_agree_in_any_chunking(chunks: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    bb = models.build("spiral", **TINY)
    # Give the hold-phase recall and the pause weights something to do, as after training.
    with torch.no_grad():
        bb.tower.breath.fill_(0.7)
        for blk in bb.blocks:
            blk.breath.add_(0.1)
    tokens = _control_stream(2, 90, seed=1)
    with torch.no_grad():
        whole, s_whole = bb.forward(tokens, bb.init_state(2))
        outs, state, s = [], bb.init_state(2), 0
        for n in [*chunks, 10_000]:
            if s >= tokens.shape[1]:
                break
            logits, state = bb.forward(tokens[:, s : s + n], state)
            outs.append(logits)
            s += n
        steps, st = [], bb.init_state(2)
        for i in range(tokens.shape[1]):
            logits, st = bb.step(tokens[:, i], st)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=1e-4, atol=1e-4)
    for k in s_whole:
        torch.testing.assert_close(state[k], s_whole[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st[k], s_whole[k], rtol=1e-4, atol=1e-4)


def test_attention_reaches_exactly_the_power_of_two_hops() -> None:
    # One layer and no painting within reach: logits at t see tokens t - {0, 1, 2, 4, 8} only.
    torch.manual_seed(0)
    bb = models.build("spiral", **{**TINY, "n_layers": 1, "paint_every": 1000})
    base = torch.randint(0, 256, (1, 40))
    t = 30
    ref = _logits_at(bb, base, t)
    for back in range(0, 20):
        changed = base.clone()
        changed[0, t - back] = (base[0, t - back] + 1) % 256
        moved = not torch.allclose(_logits_at(bb, changed, t), ref, rtol=0, atol=1e-6)
        assert moved == (back in (0, 1, 2, 4, 8)), f"token {back} back: influence {moved}"


def test_silent_keys_are_hidden_and_silent_queries_see_only_themselves() -> None:
    torch.manual_seed(0)
    cfg = SpiralConfig(d_model=16, n_heads=2, max_hop=4)
    attn = SpiralAttention(cfg)
    B, T, W = 1, 10, cfg.max_hop
    x = torch.randn(B, T, 16)
    silent = torch.zeros(B, W + T, dtype=torch.bool)
    silent[0, W + 5] = True  # token 5 is silent
    cache = torch.zeros(B, 2, 2, W, 8)
    with torch.no_grad():
        y, _ = attn(x, cache, silent, pos=0)
        x2 = x.clone()
        x2[0, 5] += 3.0
        y2, _ = attn(x2, cache, silent, pos=0)
        # Token 6 (hop 1) and 7 (hop 2) would see token 5: silence hides it from them.
        torch.testing.assert_close(y2[0, [6, 7, 9]], y[0, [6, 7, 9]], rtol=0, atol=0)
        # Token 5 attends to itself alone: its output is its own value, projected.
        v5 = F.linear(x[0, 5], attn.qkv.weight)[32:]
        torch.testing.assert_close(y[0, 5], F.linear(v5, attn.out.weight), rtol=1e-5, atol=1e-6)


def test_state_is_bounded_by_the_longest_hop() -> None:
    # Tokens further back than max_hop never reach a one-layer model without paintings.
    torch.manual_seed(0)
    bb = models.build("spiral", **{**TINY, "n_layers": 1, "paint_every": 1000})
    tokens = torch.randint(0, 256, (1, 50))
    far = tokens.clone()
    far[0, :40] = (tokens[0, :40] + 7) % 256
    torch.testing.assert_close(_logits_at(bb, far, 49), _logits_at(bb, tokens, 49), rtol=0, atol=0)
    assert bb.init_state(1)["s0.kv"].shape == (1, 2, 2, 8, 16)


def test_pause_rests_every_block_at_init() -> None:
    # The BreathClock's pause weight is 0: after WAIT, logits come from the embedding alone.
    torch.manual_seed(0)
    bb = models.build("spiral", **TINY)
    tokens = torch.tensor([[ID["OBS"], 104, 105, ID["END_OBS"], ID["SPEAK"], 111, ID["WAIT"], 120, 121]])
    with torch.no_grad():
        logits, state = bb.forward(tokens, bb.init_state())
        pos = torch.arange(tokens.shape[1])
        x = bb.embed(tokens) + bb.pos_scale * spiral.sinusoidal(pos, 32)
        bare = F.linear(rms(bb.norm, x), bb.embed.weight)
    torch.testing.assert_close(logits[:, 6:], bare[:, 6:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[:, :6], bare[:, :6], atol=1e-3)  # before the pause the blocks work
    assert PHASES[int(state["breath.phase"])] == "pause"


def test_phase_follows_the_controls_and_can_be_set_from_outside() -> None:
    torch.manual_seed(0)
    bb = models.build("spiral", **TINY)
    with torch.no_grad():
        for stream, phase in [([ID["MEM"], 65], "hold"), ([ID["THINK"], 65], "exhale"), ([ID["WAIT"]], "pause"), ([65], "inhale")]:
            _, state = bb.forward(torch.tensor([stream]), bb.init_state())
            assert PHASES[int(state["breath.phase"])] == phase
        _, state = bb.forward(torch.tensor([[ID["SPEAK"], 65, 66]]), bb.init_state())
        paused = set_breath(state, phase="pause")
        assert PHASES[int(state["breath.phase"])] == "exhale"  # the original is untouched
        nxt = torch.tensor([67])
        l_paused, _ = bb.step(nxt, paused)
        l_exhale, _ = bb.step(nxt, state)
        x = bb.embed(nxt) + bb.pos_scale * spiral.sinusoidal(torch.tensor([3]), 32)
        torch.testing.assert_close(l_paused, F.linear(rms(bb.norm, x), bb.embed.weight), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(l_exhale, l_paused, atol=1e-3)


def test_soma_charge_latches_at_end_sense() -> None:
    torch.manual_seed(0)
    bb = models.build("spiral", **TINY)
    sense = [ID["SENSE"], *b"temperature=71.0 high; felt: urgent", ID["END_SENSE"]]
    tokens = torch.tensor([[*sense, *b"after the sense"]])
    with torch.no_grad():
        _, at_end = bb.forward(tokens[:, : len(sense)], bb.init_state())
        _, before = bb.forward(tokens[:, : len(sense) - 1], bb.init_state())
        _, later = bb.forward(tokens, bb.init_state())
    assert torch.equal(before["soma.charge"], torch.zeros(1, 2))  # nothing felt until END_SENSE
    assert not torch.equal(at_end["soma.charge"], before["soma.charge"])
    assert ((at_end["soma.charge"] > 0) & (at_end["soma.charge"] < 1)).all()
    torch.testing.assert_close(later["soma.charge"], at_end["soma.charge"], rtol=0, atol=0)  # held until the next


def test_paintings_carry_their_creation_charge_and_the_oldest_is_passed_down() -> None:
    torch.manual_seed(0)
    bb = models.build("spiral", **TINY)  # 3 slots, a painting every 4 tokens
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        _, s12 = bb.forward(tokens[:, :12], bb.init_state())
        charged = set_breath(s12, charge=(0.9, 0.2))
        _, s16 = bb.forward(tokens[:, 12:], charged)
    assert torch.equal(s12["tower.charge"], torch.zeros(1, 3, 2))  # paintings 0..2 made at the initial charge
    assert (s12["tower.content"].abs().sum(-1) > 0).all()
    # Painting 3 replaced painting 0 in slot 0, with the charge in force when it was made.
    torch.testing.assert_close(s16["tower.charge"][0, 0], torch.tensor([0.9, 0.2]))
    assert not torch.allclose(s16["tower.content"][0, 0], s12["tower.content"][0, 0])
    assert torch.equal(s16["tower.content"][0, 1:], s12["tower.content"][0, 1:])


def test_recall_prefers_the_painting_that_resonates_with_the_current_charge() -> None:
    torch.manual_seed(0)
    bb = models.build("spiral", **{**TINY, "d_model": 4, "n_heads": 1, "tower_slots": 2, "paint_every": 1000})
    tower = bb.tower
    with torch.no_grad():
        tower.query.weight.zero_()  # content plays no part: only resonance and age
        tower.out.weight.copy_(torch.eye(4))
        tower.resonance_gain.fill_(20.0)
        tower.fade_logit.fill_(-30.0)
        tower.null_score.fill_(-30.0)
        state = bb.init_state()
        content = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
        made = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # painting 0 made calm, painting 1 made urgent
        t = {**state, "tower.content": content, "tower.charge": made}
        x = torch.zeros(1, 1, 4)
        hold = torch.tensor([[PHASES.index("hold")]])
        for now, expect in [((1.0, 1.0), 1), ((0.0, 0.0), 0)]:
            t["soma.charge"] = torch.tensor([now])
            # pos 2000: both paintings exist (2 and 1 paintings ago), both visible.
            out, _ = tower(x, torch.tensor([[65]]), hold, {**t, "tower.acc": torch.zeros(1, 4)}, pos=2 * 1000 + 1)
            assert int(out[0, 0].argmax()) == expect and float(out[0, 0].max()) > 0.99
        inhale, _ = tower(x, torch.tensor([[65]]), torch.zeros(1, 1, dtype=torch.long), t, pos=2001)
        assert torch.equal(inhale, x)  # recall happens in the hold phase (the seed's), at init


def test_set_breath_refuses_bad_values() -> None:
    bb = models.build("spiral", **TINY)
    state = bb.init_state()
    with pytest.raises(ValueError, match="phase"):
        set_breath(state, phase="sleep")
    with pytest.raises(ValueError, match="charge"):
        set_breath(state, charge=(0.5,))
    with pytest.raises(ValueError, match="charge"):
        set_breath(state, charge=(0.5, 1.5))
    other = models.build("astarte", d_model=32, n_layers=1, n_heads=2, state_dim=8).init_state()
    with pytest.raises(ValueError, match="spiral state"):
        set_breath(other, phase="hold")


def test_long_stream_crosses_query_block_and_prefill_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spiral, "_PREFILL_CHUNK", 96)
    monkeypatch.setattr(spiral, "_QUERY_BLOCK", 40)
    bb = models.build("spiral", **TINY)
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=260, chunks=(1, 15, 17, 100, 33))


def test_default_config_is_consistent() -> None:
    torch.manual_seed(0)
    testing.check_chunked_equals_whole_equals_step(models.build("spiral"), n_tokens=200, batch=1, chunks=(5, 16, 150))


def test_breath_weights_soma_and_tower_are_trained() -> None:
    bb = models.build("spiral", **TINY).train()
    tokens = _control_stream(2, 40, seed=3)
    logits, _ = bb(tokens, bb.init_state(2))
    logits.logsumexp(-1).mean().backward()
    for name in ("blocks.0.breath", "blocks.0.attn.hop_bias", "tower.soma.weight", "tower.paint.weight", "tower.query.weight",
                 "tower.resonance_gain", "tower.breath"):
        grad = bb.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad", [dict(max_hop=6), dict(max_hop=0), dict(d_model=30, n_heads=4), dict(tower_slots=0),
                                 dict(paint_every=0), dict(vocab_size=256), dict(no_such=1)])
def test_bad_config(bad: dict[str, int]) -> None:
    with pytest.raises(models.BackboneConfigError):
        models.build("spiral", **{**TINY, **bad})
