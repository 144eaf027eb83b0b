"""Astarte (``astarte``): five state registers on a coupled ODE, rest steps, attention over the registers.

    tokens ─► embedding u_t
      │
      ├─ ABPE  Autonomic Base Pair Encoder: five registers R [5, S] per sequence, one clock step at a time
      │        input step:  R_c = M R_(c-1) + dt ⊙ W_in(norm u_t)        (the clock step that reads token t)
      │        rest step:   R_c = M R_(c-1)                              every ``rest_every``-th clock step: no input
      │        M = exp(dt · A),  A = -diag(softplus a) + (W - Wᵀ)         per channel: a decay per register and a
      │                                                                  rotation rate for every register pair
      │
      ├─ ALS   Autonomic Layer Stack, for i in 1..n_layers, each given the clock time τ(c) of its token:
      │        AAAH  x + Wo · softmax_r(q_h·k_(r,h) / √dh · scale_h(x) + mask[r, h]) v_(r,h)
      │              q from norm(x + g_i ⊙ sinusoidal(c)); scale = softplus(W_s x); k, v = W_kv R_r, one
      │              encoding of the registers per token, shared by the layers
      │        MLP   x + SwiGLU(norm x)
      │
      └─ AIVPL Autonomic Internal Vector Prediction Layer: x + W_med · median_r(R_r) ─► norm ─► tied head

The clock: with ``rest_every`` = 4, three input steps are followed by one rest step, so token p is read at
clock step c(p) = p + p // 3, and the tokens p ≡ 2 (mod 3) are followed by a rest. A token's logits read
the registers after its rest when it has one: the model predicts from its consolidated state.

Streaming state (fixed size, fp32):
    abpe.R   [B, 5, S]   the five registers after the last clock step

Stability by construction: the symmetric part of A is negative definite, so ‖M‖₂ < 1 and the registers
stay bounded over any stream length. The update is linear in R, so a chunk is computed in parallel: a
log-depth doubling scan inside blocks of ``_BLOCK`` clock steps, then one carry per block (M^j R_start).
Decoding is one 5×5 mix per channel per token, whatever the stream's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Backbone, register
from models.layers import RMSNorm, SinusoidalTable, SwiGLU, rms, sinusoidal, swiglu
from models.tokenizer import VOCAB_SIZE

N_REGISTERS = 5
# Clock steps per block of the doubling scan (a power of two): log2(_BLOCK) mixes per block, then a carry.
_BLOCK = 64
# Prompts longer than this are processed chunk by chunk (bounded activations, flat cost per token).
_PREFILL_CHUNK = 1024


@dataclass
class AstarteConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 128  # the seed's embed_size
    n_layers: int = 6  # AAAH blocks in the layer stack
    n_heads: int = 4
    state_dim: int = 128  # S: width of each register (the seed's hidden_size)
    rest_every: int = 4  # every this many clock steps one is a rest step (the seed's pause_interval); 0: none
    dt_min: float = 1e-2  # ODE step sizes, log-spaced over the channels: time scales from 1/dt_max
    dt_max: float = 0.5  # to 1/dt_min clock steps

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1 or self.state_dim < 1:
            raise ValueError("vocab_size, d_model, n_layers and state_dim must be >= 1")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.rest_every == 1 or self.rest_every < 0:
            raise ValueError(f"rest_every must be 0 (no rest) or >= 2 (one rest per that many steps), got {self.rest_every}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    # -- the clock ------------------------------------------------------------------------------
    def clock(self, p: Tensor | int) -> Tensor | int:
        """Clock step at which token p is read."""
        return p + p // (self.rest_every - 1) if self.rest_every else p

    def rests_after(self, p: Tensor) -> Tensor:
        """Whether a rest step follows token p (bool, same shape)."""
        if not self.rest_every:
            return torch.zeros_like(p, dtype=torch.bool)
        return p % (self.rest_every - 1) == self.rest_every - 2

    def clocks_done(self, n_tokens: int) -> int:
        """Clock steps taken after ``n_tokens`` tokens, rests included."""
        return n_tokens + n_tokens // (self.rest_every - 1) if self.rest_every else n_tokens


def median5(R: Tensor) -> Tensor:
    """Elementwise median of the five registers, R [..., 5, S] -> [..., S], by a min/max network:
    7 elementwise ops instead of a sort along a 5-long axis (the slowest op of a chunk otherwise)."""
    a, b, c, d, e = R.unbind(-2)
    lo = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))  # the lowest of a..d is not the median
    hi = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))  # nor the highest
    return torch.maximum(torch.minimum(e, lo), torch.minimum(torch.maximum(e, lo), hi))  # median of (e, lo, hi)


def _mix(M: Tensor, R: Tensor) -> Tensor:
    """M [S, 5, 5] applied per channel to registers R [..., 5, S]: out[.., i, d] = Σ_j M[d, i, j] R[.., j, d]."""
    return torch.einsum("dij,...jd->...id", M, R)


class ABPE(nn.Module):
    """The register update. ``transition()`` gives M and its powers; cached at inference."""

    def __init__(self, cfg: AstarteConfig) -> None:
        super().__init__()
        S, n = cfg.state_dim, N_REGISTERS
        self.norm = RMSNorm(cfg.d_model)
        self.inp = nn.Linear(cfg.d_model, n * S, bias=False)
        # Decays softplus(a) in [0.5, 2] per register and channel; with dt this spreads time scales.
        self.decay = nn.Parameter(torch.log(torch.expm1(torch.linspace(0.5, 2.0, n)))[None, :].repeat(S, 1))
        self.couple = nn.Parameter(torch.randn(S, n, n) * 0.5)  # only W - Wᵀ is used: the rotation rates
        self.log_dt = nn.Parameter(torch.linspace(math.log(cfg.dt_min), math.log(cfg.dt_max), S))
        self.s = S
        self._cache: tuple[tuple[int, ...], tuple[Tensor, list[Tensor], Tensor]] | None = None

    def dt(self) -> Tensor:
        return self.log_dt.exp()  # (S,)

    def transition(self) -> tuple[Tensor, list[Tensor], Tensor]:
        """M [S, 5, 5]; M^(2^k) for 2^k < _BLOCK; and the table M^1..M^_BLOCK [_BLOCK, S, 5, 5]."""
        params = (self.decay, self.couple, self.log_dt)
        key = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        A = self.couple - self.couple.transpose(1, 2) - torch.diag_embed(F.softplus(self.decay))  # (S, 5, 5)
        M = torch.linalg.matrix_exp(self.dt()[:, None, None] * A)
        doubling, p = [], M
        while len(doubling) < int(math.log2(_BLOCK)):
            doubling.append(p)
            p = p @ p
        table = [M]
        for _ in range(_BLOCK - 1):
            table.append(M @ table[-1])
        out = (M, doubling, torch.stack(table))
        if not torch.is_grad_enabled():
            self._cache = (key, out)
        return out

    def drive(self, u: Tensor) -> Tensor:
        """The input term dt ⊙ W_in(norm u) of an input step: u [..., D] -> [..., 5, S]."""
        b = F.linear(rms(self.norm, u), self.inp.weight).unflatten(-1, (N_REGISTERS, self.s))
        return b * self.dt()

    def scan(self, b: Tensor, R0: Tensor) -> Tensor:
        """Registers after every clock step, R_c = M R_(c-1) + b_c from R_(-1) = R0: b [B, N, 5, S] -> [B, N, 5, S]."""
        B, N = b.shape[:2]
        M, doubling, table = self.transition()
        nb = -(-N // _BLOCK)
        y = F.pad(b, (0, 0, 0, 0, 0, nb * _BLOCK - N)).view(B, nb, _BLOCK, N_REGISTERS, self.s)
        # Inside each block: after round k, y_j = Σ_(i < 2^(k+1)) M^i b_(j-i) (Hillis-Steele doubling).
        for k, Mk in enumerate(doubling):
            s = 1 << k
            y = torch.cat([y[:, :, :s], y[:, :, s:] + _mix(Mk, y[:, :, :-s])], dim=2)
        # Across blocks: the register state entering each block, one sequential step per block.
        starts, r = [], R0
        for j in range(nb):
            starts.append(r)
            r = y[:, j, -1] + _mix(table[-1], r)
        carry = torch.einsum("jdik,bnkd->bnjid", table, torch.stack(starts, dim=1))  # M^(j+1) R_start
        return (y + carry).view(B, nb * _BLOCK, N_REGISTERS, self.s)[:, :N]


class AAAH(nn.Module):
    """Autonomic Aggregated Attention Head: each token's heads attend over the five registers."""

    def __init__(self, cfg: AstarteConfig) -> None:
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.h, self.dh = H, D // H
        self.time_gain = nn.Parameter(torch.full((D,), 0.02))  # how strongly this layer sees the clock
        self.norm = RMSNorm(D)
        self.q = nn.Linear(D, D, bias=False)
        self.scale = nn.Linear(D, H)  # input-dependent sharpness per head
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, math.log(math.e - 1))  # softplus -> 1 at init
        self.mask = nn.Parameter(torch.zeros(N_REGISTERS, H))  # learned register preference per head
        self.out = nn.Linear(D, D, bias=False)
        self.norm2 = RMSNorm(D)
        self.mlp = SwiGLU(D)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, tau: Tensor) -> Tensor:
        """x [B, T, D], register keys/values k, v [B, T, 5, H, dh], clock features tau [T, D] -> x [B, T, D]."""
        B, T, D = x.shape
        xn = rms(self.norm, x + self.time_gain * tau)
        q = F.linear(xn, self.q.weight).view(B, T, 1, self.h, self.dh)
        # Five keys per token: an elementwise product and a sum beat a batched matmul of 5-wide matrices.
        sharp = F.softplus(F.linear(xn, self.scale.weight, self.scale.bias)) / math.sqrt(self.dh)  # (B, T, H)
        scores = (q * k).sum(-1) * sharp[:, :, None] + self.mask  # (B, T, 5, H)
        y = (scores.softmax(2)[..., None] * v).sum(2).reshape(B, T, D)
        x = x + F.linear(y, self.out.weight)
        return x + swiglu(self.mlp, rms(self.norm2, x))


@register
class Astarte(Backbone):
    """Astarte. See the module docstring for the block tree, the clock and the state layout."""

    name = "astarte"
    Config = AstarteConfig

    def __init__(self, config: AstarteConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.abpe = ABPE(c)
        # The registers are encoded once per token as keys and values; every layer's AAAH attends
        # over them with its own queries, sharpness and mask.
        self.kv = nn.Linear(c.state_dim, 2 * c.d_model, bias=False)
        self.layers = nn.ModuleList(AAAH(c) for _ in range(c.n_layers))
        self.median_proj = nn.Linear(c.state_dim, c.d_model, bias=False)
        self.norm = RMSNorm(c.d_model)
        self._tau = SinusoidalTable(c.d_model)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        return {"abpe.R": torch.zeros(batch_size, N_REGISTERS, self.config.state_dim, device=self.device)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        outs = []
        for s in range(0, tokens.shape[1], _PREFILL_CHUNK):
            logits, tensors = self._chunk(tokens[:, s : s + _PREFILL_CHUNK], tensors, pos + s)
            outs.append(logits)
        return torch.cat(outs, dim=1), tensors

    def _chunk(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        c, dev = self.config, tokens.device
        B, T = tokens.shape
        p = torch.arange(pos, pos + T, device=dev)
        c0 = c.clocks_done(pos)
        n_clocks = c.clocks_done(pos + T) - c0
        u = self.embed(tokens)  # (B, T, D)
        read_at = c.clock(p) - c0  # (T,) clock index (in this chunk) of each token's input step
        b = u.new_zeros(B, n_clocks, N_REGISTERS, c.state_dim)
        b = b.index_copy(1, read_at, self.abpe.drive(u))  # rest steps keep a zero drive
        R = self.abpe.scan(b, tensors["abpe.R"])  # (B, n_clocks, 5, S)
        R_read = R[:, read_at + c.rests_after(p).long()]  # after the token's rest, if it has one
        tau = sinusoidal(c.clock(p), c.d_model).to(dev)
        return self._head(u, R_read, tau), {"abpe.R": R[:, -1]}

    def _step(self, token: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One token: the input step (and its rest step), then the layer stack on one position."""
        c = self.config
        M = self.abpe.transition()[0]
        u = self.embed(token)  # (B, D)
        R = _mix(M, tensors["abpe.R"]) + self.abpe.drive(u)
        if c.rest_every and pos % (c.rest_every - 1) == c.rest_every - 2:
            R = _mix(M, R)
        tau = self._tau(int(c.clock(pos)), token.device)
        return self._head(u[:, None], R[:, None], tau)[:, 0], {"abpe.R": R}

    def _head(self, u: Tensor, R: Tensor, tau: Tensor) -> Tensor:
        """The layer stack and the prediction layer: u [B, T, D], R [B, T, 5, S] -> logits [B, T, V]."""
        B, T = u.shape[:2]
        H = self.config.n_heads
        k, v = F.linear(R, self.kv.weight).view(B, T, N_REGISTERS, 2, H, -1).unbind(3)  # each (B, T, 5, H, dh)
        x = u
        for layer in self.layers:
            x = layer(x, k, v, tau)
        x = x + self.median_proj(median5(R))  # the median over the five registers
        return F.linear(rms(self.norm, x), self.embed.weight)
