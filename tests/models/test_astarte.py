"""astarte specifics the shared invariants do not reach: the clock and its rest steps against a plain
sequential reference, the stability of the register update, the median network, the caches, the config."""

from __future__ import annotations

import pytest
import torch

import models
from models import astarte, testing
from models.astarte import N_REGISTERS, AstarteConfig, median5

TINY = dict(d_model=32, n_layers=2, n_heads=2, state_dim=16)


def _reference_registers(bb: astarte.Astarte, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The seed's loop, one clock step at a time: an input step per token, then a rest step (no input)
    after every ``rest_every - 1`` tokens. Returns the registers and the number of clock steps taken."""
    M = bb.abpe.transition()[0]
    R = torch.zeros(tokens.shape[0], N_REGISTERS, bb.config.state_dim)
    clocks = 0
    for p in range(tokens.shape[1]):
        R = astarte._mix(M, R) + bb.abpe.drive(bb.embed(tokens[:, p]))
        clocks += 1
        if bb.config.rest_every and clocks % bb.config.rest_every == bb.config.rest_every - 1:
            R = astarte._mix(M, R)  # the rest step: the state propagates, nothing is read
            clocks += 1
    return R, clocks


@pytest.mark.parametrize("rest_every", [0, 2, 4, 5])
def test_registers_follow_the_sequential_clock(rest_every: int) -> None:
    torch.manual_seed(0)
    bb = models.build("astarte", **TINY, rest_every=rest_every)
    tokens = torch.randint(0, 256, (2, 150))  # > _BLOCK clock steps: the block carry runs
    with torch.no_grad():
        _, state = bb.forward(tokens, bb.init_state(2))
        ref, clocks = _reference_registers(bb, tokens)
    torch.testing.assert_close(state["abpe.R"], ref, rtol=1e-4, atol=1e-5)
    assert clocks == bb.config.clocks_done(150)


def test_clock_places_a_rest_every_fourth_step() -> None:
    c = AstarteConfig()
    p = torch.arange(12)
    assert c.clock(p).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]  # clock 3, 7, 11: rests
    assert c.rests_after(p).nonzero().flatten().tolist() == [2, 5, 8, 11]
    assert c.clocks_done(3) == 4 and c.clocks_done(4) == 5


def test_a_rest_step_reads_no_input() -> None:
    # After token 2 the registers rest: the rest step applies M once more and reads nothing, so the
    # state after three tokens is M (M R_2' + drive) with no fourth drive, whatever the weights.
    torch.manual_seed(0)
    bb = models.build("astarte", **TINY)
    tokens = torch.randint(0, 256, (1, 3))
    with torch.no_grad():
        _, s2 = bb.forward(tokens[:, :2], bb.init_state())
        _, s3 = bb.forward(tokens, bb.init_state())
        M = bb.abpe.transition()[0]
        input_step = astarte._mix(M, s2["abpe.R"]) + bb.abpe.drive(bb.embed(tokens[:, 2]))
    torch.testing.assert_close(s3["abpe.R"], astarte._mix(M, input_step), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s3["abpe.R"], input_step)  # the rest did something


def test_update_is_contractive_for_any_weights() -> None:
    # The symmetric part of A is -diag(softplus a): negative definite, so the spectral norm of M is < 1
    # even for wild coupling weights, and the registers stay bounded under any input.
    torch.manual_seed(1)
    bb = models.build("astarte", **TINY)
    with torch.no_grad():
        bb.abpe.couple.mul_(20.0)
        bb.abpe.decay.fill_(-8.0)  # decays of ~3e-4: slow, but still contractive
        M = bb.abpe.transition()[0]
        assert float(torch.linalg.matrix_norm(M, ord=2).max()) < 1.0
        bb.embed.weight.mul_(1e3)
        _, state = bb.forward(torch.randint(0, 256, (1, 3000)), bb.init_state())
    assert torch.isfinite(state["abpe.R"]).all()


def test_median_network_matches_torch_median_and_passes_gradients() -> None:
    x = torch.randn(64, N_REGISTERS, 7, requires_grad=True)
    med = median5(x)
    assert torch.equal(med, x.median(dim=1).values)
    med.sum().backward()
    assert x.grad is not None and torch.equal(x.grad.sum(dim=1), torch.ones(64, 7))  # one register per element


def test_long_stream_crosses_block_and_prefill_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(astarte, "_PREFILL_CHUNK", 96)
    bb = models.build("astarte", **TINY)
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=260, chunks=(1, 15, 17, 100, 33))


def test_default_config_is_consistent() -> None:
    torch.manual_seed(0)
    testing.check_chunked_equals_whole_equals_step(models.build("astarte"), n_tokens=200, batch=1, chunks=(5, 16, 150))


def test_transition_cache_follows_weight_changes() -> None:
    torch.manual_seed(0)
    bb = models.build("astarte", **TINY)
    tokens = torch.randint(0, 256, (1, 30))
    with torch.inference_mode():
        before = bb.forward(tokens, bb.init_state())[0]
    with torch.no_grad():
        bb.abpe.couple.mul_(1.5)  # an in-place update, like an optimizer step
    with torch.inference_mode():
        after = bb.forward(tokens, bb.init_state())[0]
    fresh = astarte.Astarte(bb.config).eval()
    fresh.load_state_dict(bb.state_dict())
    with torch.inference_mode():
        expected = fresh.forward(tokens, fresh.init_state())[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_every_part_is_trained() -> None:
    bb = models.build("astarte", **TINY).train()
    logits, _ = bb(torch.randint(0, 256, (2, 20)), bb.init_state(2))
    logits.logsumexp(-1).mean().backward()
    for name in ("abpe.decay", "abpe.couple", "abpe.log_dt", "abpe.inp.weight", "kv.weight", "median_proj.weight",
                 "layers.0.time_gain", "layers.0.mask", "layers.1.scale.weight"):
        grad = bb.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_state_layout_and_size() -> None:
    bb = models.build("astarte", **TINY)
    state = bb.init_state(3)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"abpe.R": (3, 5, 16)}
    assert state.nbytes() == 3 * 5 * 16 * 4


@pytest.mark.parametrize("bad", [dict(rest_every=1), dict(rest_every=-2), dict(d_model=30, n_heads=4), dict(dt_min=0.0),
                                 dict(dt_min=0.5, dt_max=0.1), dict(state_dim=0), dict(no_such=1)])
def test_bad_config(bad: dict[str, float]) -> None:
    with pytest.raises(models.BackboneConfigError):
        models.build("astarte", **{**TINY, **bad})
