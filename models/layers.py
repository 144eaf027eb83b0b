"""Layers shared by the architectures: RMSNorm, SwiGLU, RoPE, sinusoidal positions, and a causal
sliding-window attention whose KV cache is a fixed-size part of the backbone state.

Streaming contract of ``SlidingWindowAttention``: a chunk of T tokens at absolute position ``pos``
attends to the cached last W keys/values plus the chunk itself, each query seeing the W most recent
positions including its own. Processing a stream in any chunking (or token by token) gives the
same outputs up to float rounding; cost is O(T * W), never O(T^2) for T > W.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or int(8 * dim / 3 + 7) // 8 * 8
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rms(norm: RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)``'s arithmetic in one fused op, for the hot paths (decoding pays per op)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


def swiglu(mlp: SwiGLU, x: Tensor) -> Tensor:
    """``mlp(x)``'s arithmetic without the module calls, for the hot paths (decoding pays per call)."""
    return F.linear(F.silu(F.linear(x, mlp.gate.weight)) * F.linear(x, mlp.up.weight), mlp.down.weight)


def sinusoidal(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Sinusoidal embeddings [T, dim] for absolute positions [T], computed in float64 so that far
    positions (months of streaming) keep their precision before the cast to fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, dtype=torch.float64) / half)
    ang = positions.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(torch.float32)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim/2] for rotary embeddings at absolute positions [T] (float64 angles)."""
    half = head_dim // 2
    inv = 1.0 / base ** (torch.arange(half, dtype=torch.float64) / half)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


@functools.lru_cache(maxsize=8)
def _rope_at(pos: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """rope_cos_sin at one position on ``device``, cached: every attention layer of a decoding step
    asks for the same one. Made outside inference mode, so the cached tensors also serve autograd."""
    with torch.inference_mode(False), torch.no_grad():
        cos, sin = rope_cos_sin(torch.tensor([pos]), head_dim, base)
        return cos.to(device), sin.to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, Dh] by cos/sin [T, Dh/2] (split-halves convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SlidingWindowAttention(nn.Module):
    """Causal multi-head attention over the last ``window`` positions, with a streaming KV cache.

    Cache tensors (part of the backbone state): k, v [B, H, W, Dh], oldest first. Slots before the
    stream's start are masked by position, so no separate fill counter is needed.
    """

    def __init__(self, dim: int, n_heads: int, window: int, rope: bool = True, rope_base: float = 10000.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim, self.window = n_heads, dim // n_heads, window
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got {self.head_dim}")
        self.rope, self.rope_base = rope, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_cache(self, batch_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        shape = (batch_size, self.n_heads, self.window, self.head_dim)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] at absolute position ``pos`` -> (y [B, T, D], new k_cache, new v_cache)."""
        outs = []
        for s in range(0, x.shape[1], self.window):  # blocks of <= W keep the cost O(T * W)
            y, k_cache, v_cache = self._block(x[:, s : s + self.window], k_cache, v_cache, pos + s)
            outs.append(y)
        return torch.cat(outs, dim=1), k_cache, v_cache

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """One token x [B, D] at absolute position ``pos``: ``forward`` on a length-1 chunk in fewer
        ops (decoding pays per op). The new cache is also the key set: the last W positions."""
        B, D = x.shape
        W, H, Dh = self.window, self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, 3, H, 1, Dh).unbind(1)  # each (B, H, 1, Dh)
        if self.rope:
            cos, sin = _rope_at(pos, Dh, self.rope_base, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = torch.cat([k_cache[:, :, 1:], k], dim=2)  # (B, H, W, Dh): positions pos-W+1 .. pos
        vals = torch.cat([v_cache[:, :, 1:], v], dim=2)
        mask = None
        if pos < W - 1:  # slots before the stream's start
            mask = (torch.arange(W, device=x.device) >= W - 1 - pos)[None, :]  # (1, W)
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)  # (B, H, 1, Dh)
        return self.out(y.reshape(B, D)), keys, vals

    def _block(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, D = x.shape
        W, H, Dh = self.window, self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        qpos = torch.arange(pos, pos + T, device=x.device)
        if self.rope:
            cos, sin = rope_cos_sin(qpos, Dh, self.rope_base)
            q, k = apply_rope(q, cos.to(x.device), sin.to(x.device)), apply_rope(k, cos.to(x.device), sin.to(x.device))
        keys = torch.cat([k_cache, k], dim=2)  # (B, H, W+T, Dh)
        vals = torch.cat([v_cache, v], dim=2)
        kpos = torch.arange(pos - W, pos + T, device=x.device)
        delta = qpos[:, None] - kpos[None, :]  # (T, W+T)
        allowed = (delta >= 0) & (delta < W) & (kpos[None, :] >= 0)
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out(y), keys[:, :, -W:].contiguous(), vals[:, :, -W:].contiguous()


class SinusoidalTable:
    """``sinusoidal(pos)`` rows [1, dim] for decoding one position at a time, served from a table of the
    next ``size`` positions: the same float64 arithmetic per position as a whole-chunk call (so
    bit-identical to it), without recomputing sin/cos every step."""

    def __init__(self, dim: int, size: int = 256) -> None:
        self.dim, self.size = dim, size
        self.start, self.table = 0, torch.empty(0, dim)

    def __call__(self, pos: int, device: torch.device) -> Tensor:
        if not self.start <= pos < self.start + self.table.shape[0] or self.table.device != device:
            with torch.inference_mode(False), torch.no_grad():  # usable from inference mode and autograd alike
                self.start, self.table = pos, sinusoidal(torch.arange(pos, pos + self.size), self.dim).to(device)
        return self.table[pos - self.start][None]
