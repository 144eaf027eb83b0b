"""agiformer (AGIFORMER v2) specifics the shared invariants do not reach: the overlapping patch encoder and
where patches end, the partial patch buffered in the state, the Hebbian memory's parallel form against its
recurrence and its input-dependent decay, adaptive computation's early exit, and the decoder's slots."""

from __future__ import annotations

import pytest
import torch

import models
from models import testing
from models.agiformer import AgiformerConfig, HebbianMemory, ReasoningBlock

TINY = dict(d_model=32, n_layers=2, n_heads=2, window=4, d_local=8)


def _build(**overrides: object) -> models.Backbone:
    torch.manual_seed(0)
    return models.build("agiformer", **{**TINY, **overrides})


def test_seed_shapes_kernel_6_stride_4() -> None:
    bb = _build()
    assert bb.conv.kernel_size == (6,) and bb.conv.stride == (4,)
    assert bb.decoder.slot.num_embeddings == 4  # four bytes decoded per latent
    state = bb.init_state(3)
    assert state["buf"].shape == (3, 5) and state["buf"].dtype == torch.long  # kernel - 1 bytes
    assert state["b0.mem"].shape == (3, 2, 16, 16)


@pytest.mark.parametrize("bad", [dict(patch=4, kernel=3), dict(patch=0), dict(kernel=1, patch=1), dict(n_heads=3),
                                 dict(reason_steps=0), dict(act_eps=1.0)])
def test_bad_configs_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(models.BackboneConfigError):
        models.build("agiformer", **{**TINY, **bad})


def test_partial_patch_is_buffered_and_the_trunk_runs_at_patch_ends() -> None:
    bb = _build()
    tok = torch.tensor([[10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        _, s3 = bb.forward(tok[:, :3], bb.init_state(1))
        assert s3["buf"].tolist() == [[-1, -1, 10, 11, 12]]
        assert torch.equal(s3["z"], torch.zeros_like(s3["z"])) and not s3["b0.mem"].any()  # no patch complete yet
        _, s4 = bb.step(tok[0, 3:4], s3)
        assert s4["z"].abs().sum() > 0 and s4["b0.mem"].abs().sum() > 0  # byte 3 closed patch 0
        _, s6 = bb.forward(tok[:, 4:6], s4)
        assert s6["buf"].tolist() == [[11, 12, 13, 14, 15]]
        assert torch.equal(s6["z"], s4["z"]) and torch.equal(s6["b0.mem"], s4["b0.mem"])


def test_logits_see_the_latent_of_the_last_complete_patch_and_the_bytes_after_it() -> None:
    """Position t = 4j+3+i decodes from latent j and bytes 4j+4..t: changing byte 4j+4 leaves every
    position before it alone, changes the positions of its patch, and changes latent j+1's positions."""
    bb = _build()
    a = testing.random_tokens(bb, 1, 24, seed=1)
    b = a.clone()
    b[0, 8] = (a[0, 8] + 1) % 256
    with torch.no_grad():
        la, _ = bb.forward(a, bb.init_state(1))
        lb, _ = bb.forward(b, bb.init_state(1))
    diff = (la - lb).abs().amax(-1)[0]
    assert diff[:8].max() == 0
    assert (diff[8:] > 1e-6).all()


def test_every_output_position_depends_on_its_own_byte() -> None:
    bb = _build()
    a = testing.random_tokens(bb, 1, 16, seed=2)
    with torch.no_grad():
        la, _ = bb.forward(a, bb.init_state(1))
        for t in range(16):
            b = a.clone()
            b[0, t] = (a[0, t] + 7) % 256
            lb, _ = bb.forward(b, bb.init_state(1))
            assert (la[0, t] - lb[0, t]).abs().max() > 1e-6, t


def _hebbian_reference(mem_mod: HebbianMemory, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one latent at a time: M = λ M + k vᵀ, y = qᵀ M."""
    B, J, D = x.shape
    H, Dh = mem_mod.n_heads, mem_mod.head_dim
    q, k, v = mem_mod.qkv(x).view(B, J, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    lam = torch.sigmoid(mem_mod.decay_net(x)).transpose(1, 2)  # (B, H, J)
    ys = []
    for t in range(J):
        mem = lam[:, :, t, None, None] * mem + k[:, :, t, :, None] * v[:, :, t, None, :]
        ys.append((q[:, :, t, None, :] @ mem)[:, :, 0])
    y = torch.stack(ys, dim=2).transpose(1, 2).reshape(B, J, D)
    return mem_mod.out(y), mem


def test_hebbian_parallel_form_equals_the_recurrence_across_blocks() -> None:
    torch.manual_seed(0)
    hm = HebbianMemory(32, 2, decay_bias=1.0)
    torch.nn.init.normal_(hm.decay_net.weight, std=0.5)  # decay varies with the input
    x = torch.randn(2, HebbianMemory.BLOCK + 37, 32)
    mem0 = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        y, mem = hm(x, mem0)
        y_ref, mem_ref = _hebbian_reference(hm, x, mem0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mem, mem_ref, rtol=1e-4, atol=1e-4)


def test_decay_depends_on_the_input_and_trains() -> None:
    bb = _build()
    hm = bb.blocks[0].hebb
    torch.nn.init.normal_(hm.decay_net.weight, std=0.5)
    x = torch.randn(1, 5, 32)
    lam = torch.sigmoid(hm.decay_net(x))
    assert lam.std() > 1e-3
    logits, _ = bb(testing.random_tokens(bb, 1, 16, seed=3), bb.init_state(1))
    logits.sum().backward()
    assert hm.decay_net.weight.grad is not None and hm.decay_net.weight.grad.abs().sum() > 0


def test_act_exits_early_when_the_gate_is_sure_and_runs_every_step_when_not() -> None:
    cfg = AgiformerConfig(d_model=32, n_heads=2, reason_steps=6, exit_bias=30.0)
    sure = ReasoningBlock(cfg).eval()
    z = torch.randn(2, 5, 32)
    with torch.no_grad():
        sure(z)
    assert sure.last_steps == 1  # remaining mass e^-30 after the first gate
    unsure = ReasoningBlock(AgiformerConfig(d_model=32, n_heads=2, reason_steps=6, exit_bias=-30.0)).eval()
    with torch.no_grad():
        unsure(z)
    assert unsure.last_steps == 6
    sure.train()
    sure(z)
    assert sure.last_steps == 6  # training always runs the bounded number, so every step gets gradients


def test_act_output_is_the_halting_weighted_mean() -> None:
    cfg = AgiformerConfig(d_model=8, n_heads=2, reason_steps=3, act_eps=0.0)
    rb = ReasoningBlock(cfg).eval()
    z = torch.randn(1, 4, 8)
    with torch.no_grad():
        zs, hs, cur = [], [], z
        for _ in range(3):
            cur = cur + rb.mlp(rb.norm(cur))
            zs.append(cur)
            hs.append(torch.sigmoid(rb.exit(cur)))
        p0 = hs[0]
        p1 = (1 - hs[0]) * hs[1]
        p2 = (1 - hs[0]) * (1 - hs[1])
        torch.testing.assert_close(rb(z), p0 * zs[0] + p1 * zs[1] + p2 * zs[2])


def test_streams_agree_with_a_sure_exit_gate() -> None:
    """Early exits differ between a whole chunk and single steps; outputs still agree within rtol."""
    bb = _build(exit_bias=12.0, reason_steps=5)
    testing.check_chunked_equals_whole_equals_step(bb, n_tokens=40)


def test_other_patch_sizes_stream_too() -> None:
    testing.check_chunked_equals_whole_equals_step(_build(patch=3, kernel=5), n_tokens=40)
    testing.check_causal(_build(patch=2, kernel=2))
