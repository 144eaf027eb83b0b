"""hyena (SpectralGPT) specifics the shared invariants do not reach: long chunks through every
internal path (FFT long conv, memory blocks, prefill chunking), the filter cache, the config."""

from __future__ import annotations

import pytest
import torch

import models
from models import hyena, testing
from models.hyena import Hyena, HyenaConfig, HyenaOperator

TINY = dict(d_model=32, n_layers=2, filter_len=16, window=8, n_heads=2, attn_every=2, mem_every=1, mem_slots=4)


def test_long_stream_crosses_every_internal_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the prefill chunk and memory block so a short stream crosses both several times.
    monkeypatch.setattr(hyena, "_PREFILL_CHUNK", 96)
    monkeypatch.setattr(hyena, "_MEM_BLOCK", 40)
    bb = models.build("hyena", **TINY)
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=260, chunks=(1, 15, 17, 100, 33))


def test_default_config_is_consistent_through_the_fft_path() -> None:
    torch.manual_seed(0)
    bb = models.build("hyena")
    assert bb.config.filter_len > hyena._DIRECT_MAX
    # 300 tokens: FFT long convs in one chunk, direct windows in small chunks, a partial memory block.
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=300, batch=1, chunks=(5, 16, 250))


def test_fft_and_direct_long_conv_agree_with_a_reference() -> None:
    torch.manual_seed(0)
    op = HyenaOperator(HyenaConfig(**TINY)).eval()
    B, D, L, T = 2, 32, 16, 40
    v, hist = torch.randn(B, D, T), torch.randn(B, D, L - 1)
    with torch.no_grad():
        h, derived = op.filters()
        full = torch.cat([hist, v], dim=-1)
        # Reference: y_t = Σ_k h[k] u[t-k] + skip · v_t, straight from the definition.
        ref = torch.stack([(full[..., t : t + L] * h[0].flip(-1)).sum(-1) for t in range(T)], dim=-1) + op.skip[0][:, None] * v
        fft, new_hist = op._long_conv(v, hist, h, derived, 0)
        direct = torch.cat([op._long_conv(v[..., i : i + 8], full[..., i : i + L - 1], h, derived, 0)[0] for i in range(0, T, 8)], dim=-1)
    torch.testing.assert_close(fft, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_hist, full[..., -(L - 1) :])


def test_filter_cache_follows_weight_changes() -> None:
    torch.manual_seed(0)
    bb = models.build("hyena", **TINY)
    tokens = torch.randint(0, 256, (1, 30))
    with torch.inference_mode():
        before = bb.forward(tokens, bb.init_state())[0]
    with torch.no_grad():
        for p in bb.blocks["h0"].op.filter.parameters():
            p.mul_(1.5)  # an in-place update, like an optimizer step
    with torch.inference_mode():
        after = bb.forward(tokens, bb.init_state())[0]
    fresh = Hyena(bb.config).eval()
    fresh.load_state_dict(bb.state_dict())
    with torch.inference_mode():
        expected = fresh.forward(tokens, fresh.init_state())[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_filters_are_trained() -> None:
    bb = models.build("hyena", **TINY).train()
    logits, _ = bb(torch.randint(0, 256, (2, 20)), bb.init_state(2))
    logits.logsumexp(-1).mean().backward()
    op = bb.blocks["h0"].op
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in op.filter.parameters())
    assert op.skip.grad is not None and bb.blocks["m0"].decay_logit.grad is not None


def test_state_layout_and_size() -> None:
    bb = models.build("hyena", **TINY)
    state = bb.init_state(3)
    assert state["h0.long"].shape == (3, 1, 32, 15)  # L-1 inputs per long conv: exact, no more
    assert state["h0.short"].shape == (3, 3 * 32, 2)
    assert state["m0.mem"].shape == (3, 4, 32)
    assert state["a1.k"].shape == (3, 2, 8, 16)
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.parametrize(
    "bad",
    [dict(order=1), dict(filter_len=1), dict(filter_emb=4), dict(d_model=30, n_heads=4), dict(attn_every=-1), dict(no_such=1)],
)
def test_bad_config(bad: dict[str, int]) -> None:
    with pytest.raises(models.BackboneConfigError):
        models.build("hyena", **{**TINY, **bad})


def test_default_layer_plan() -> None:
    bb = models.build("hyena")
    assert list(bb.blocks) == ["h0", "h1", "h2", "m2", "h3", "h4", "h5", "m5", "a5"]
