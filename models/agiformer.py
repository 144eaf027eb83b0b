"""AGIFORMER v2 (``agiformer``, seed 004): a byte-latent transformer whose trunk runs once per
patch of ``patch`` bytes, with a Hebbian fast-weight memory, adaptive-computation reasoning and a
parallel MLP decoder that predicts the next ``patch`` bytes from each latent.

    bytes ─► ByteLatentEncoder    embed ─► Conv1d(kernel 6, stride 4) ─► RMSNorm       one latent per patch
      │                           (a patch's window is its 4 bytes and the 2 before: overlapping)
      ├─ for i in 1..n_layers:  HybridBlock, at latent rate
      │     g = sigmoid(W_g n(x))                     gated fusion of the two mixers
      │     x + g·SWA(n x) + (1-g)·Hebbian(n x)       SWA: causal sliding window over latents (RoPE)
      │                                               Hebbian: M_t = λ(x_t)·M_{t-1} + k_t v_tᵀ, read q_tᵀM_t,
      │                                               λ from decay_net (input-dependent decay)
      │     x + SwiGLU(n x)
      ├─ ReasoningBlock (ACT): z ← z + SwiGLU(n z) up to ``reason_steps`` times; an exit gate
      │     h_n = sigmoid(w·z_n) gives halting weights p_n = h_n·Π(1-h_m), the remainder on the last
      │     step; out = Σ p_n z_n. Inference stops early once every latent's remaining mass < act_eps.
      └─ RMSNorm ─► z_j ─► ParallelDecoder: slot i of latent j predicts byte 4j+4+i (4 slots, one MLP)

Causality (why each output may see what it sees). Patches are aligned to absolute positions:
patch j holds bytes 4j..4j+3, and latent z_j exists once byte 4j+3 has been read. The logits at
byte position t predict byte t+1, so they come from the newest complete latent, j = (t+1)//4 - 1,
decoder slot i = (t+1) % 4: t = 4j+3+i. The conv window of z_j ends at byte 4j+3 <= t, the trunk is
causal over latents, so nothing after t leaks in. With a purely parallel decoder, slots 1..3 would
predict bytes without knowing the ones just before them in the same patch, although position t has
read them; so each slot also gets the bytes of the current patch up to t (slot i: the last i bytes,
zeros for the rest). That keeps one MLP evaluation per (latent, slot), all slots in parallel during
training, and makes every position depend on its own byte. Positions 0..2 (before any complete
patch) decode from the initial latent, zeros.

Streaming state (fixed size):
    buf          [B, kernel-1]   int64  the last kernel-1 byte ids (-1 before the stream's start):
                                        the conv overlap plus the partial patch
    z            [B, D]          fp32   the newest latent, decoded until the next patch completes
    b{i}.k/.v    [B, H, W, Dh]   fp32   latent-rate sliding-window KV cache
    b{i}.mem     [B, H, Dh, Dh]  fp32   Hebbian fast weights
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Backbone, register
from models.layers import RMSNorm, SlidingWindowAttention, SwiGLU
from models.tokenizer import VOCAB_SIZE


@dataclass
class AgiformerConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    patch: int = 4  # bytes per latent (the encoder's stride; the decoder's slots)
    kernel: int = 6  # encoder Conv1d kernel: kernel - patch bytes overlap the previous patch
    window: int = 64  # latents each SWA query sees (64 latents = 256 bytes)
    rope_base: float = 10000.0
    decay_bias: float = 3.0  # initial decay_net bias: λ ≈ sigmoid(3) ≈ 0.95 per latent
    reason_steps: int = 4  # ACT: most refinement steps per latent
    act_eps: float = 1e-5  # inference stops refining once every latent's remaining mass is below this
    exit_bias: float = 1.0  # initial exit-gate logit
    d_local: int = 32  # decoder's embedding of the bytes already read in the current patch

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, d_model and n_layers must be >= 1")
        if self.n_heads < 1 or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size (RoPE)")
        if self.patch < 1 or self.kernel < self.patch:
            # A kernel shorter than the stride would skip bytes between windows.
            raise ValueError(f"need 1 <= patch <= kernel, got patch {self.patch}, kernel {self.kernel}")
        if self.kernel < 2:
            raise ValueError(f"kernel must be >= 2 (the state buffers kernel-1 bytes), got {self.kernel}")
        if self.window < 1 or self.reason_steps < 1 or self.d_local < 1:
            raise ValueError("window, reason_steps and d_local must be >= 1")
        if not 0.0 <= self.act_eps < 1.0:
            raise ValueError(f"act_eps must be in [0, 1), got {self.act_eps}")


def _segsum(x: Tensor) -> Tensor:
    """x [..., J] -> [..., J, J] with out[t, s] = Σ_{s<r<=t} x_r for s <= t, -inf above the diagonal.
    Summed directly rather than as cumsum differences, which lose precision over long chunks."""
    J = x.shape[-1]
    x = x[..., None].expand(*x.shape, J)  # [..., t, s] = x_t
    x = x.masked_fill(~torch.tril(torch.ones(J, J, dtype=torch.bool, device=x.device), diagonal=-1), 0.0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(J, J, dtype=torch.bool, device=x.device)), float("-inf"))


class HebbianMemory(nn.Module):
    """Fast weights per head: M_t = λ_t M_{t-1} + k_t v_tᵀ, y_t = q_tᵀ M_t, λ_t = sigmoid(decay_net(x_t)).
    q and k are unit vectors, so with λ < 1 the memory stays bounded however long the stream."""

    BLOCK = 64  # latents per parallel block: the O(J²) decay matrix stays small

    def __init__(self, dim: int, n_heads: int, decay_bias: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.decay_net = nn.Linear(dim, n_heads)
        nn.init.zeros_(self.decay_net.weight)
        nn.init.constant_(self.decay_net.bias, decay_bias)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, J, D], mem [B, H, Dh, Dh] -> (y [B, J, D], mem after the last latent)."""
        B, J, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, J, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, J, Dh)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logl = F.logsigmoid(self.decay_net(x)).transpose(1, 2)  # (B, H, J)
        ys = []
        for s in range(0, J, self.BLOCK):
            qb, kb, vb, lb = q[:, :, s : s + self.BLOCK], k[:, :, s : s + self.BLOCK], v[:, :, s : s + self.BLOCK], logl[:, :, s : s + self.BLOCK]
            decay = torch.exp(_segsum(lb))  # (B, H, j, j): λ_{s+1}···λ_t
            from_start = torch.exp(torch.cumsum(lb, dim=-1))  # (B, H, j): λ_1···λ_t on the carried memory
            ys.append((qb @ kb.transpose(-1, -2) * decay) @ vb + from_start[..., None] * (qb @ mem))
            mem = from_start[..., -1, None, None] * mem + (kb * decay[..., -1, :, None]).transpose(-1, -2) @ vb
        y = torch.cat(ys, dim=2).transpose(1, 2).reshape(B, J, D)
        return self.out(y), mem


class HybridBlock(nn.Module):
    """Sliding-window attention and Hebbian memory, mixed by an input-dependent gate; then SwiGLU."""

    def __init__(self, cfg: AgiformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = SlidingWindowAttention(cfg.d_model, cfg.n_heads, cfg.window, rope=True, rope_base=cfg.rope_base)
        self.hebb = HebbianMemory(cfg.d_model, cfg.n_heads, cfg.decay_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mem: Tensor, lpos: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, J, D] latents from latent position ``lpos`` -> (x, k, v, mem)."""
        h = self.norm1(x)
        a, k, v = self.attn(h, k, v, lpos)
        m, mem = self.hebb(h, mem)
        g = torch.sigmoid(self.gate(h))
        x = x + g * a + (1 - g) * m
        return x + self.mlp(self.norm2(x)), k, v, mem


class ReasoningBlock(nn.Module):
    """Adaptive computation time per latent, position-wise (so streaming needs no state for it)."""

    def __init__(self, cfg: AgiformerConfig) -> None:
        super().__init__()
        self.steps, self.eps = cfg.reason_steps, cfg.act_eps
        self.norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model)
        self.exit = nn.Linear(cfg.d_model, 1)
        nn.init.constant_(self.exit.bias, cfg.exit_bias)
        self.last_steps = 0  # refinement steps the last call ran (for benches and curiosity)

    def forward(self, z: Tensor) -> Tensor:
        remain = torch.ones_like(z[..., :1])  # halting mass not yet spent
        out = torch.zeros_like(z)
        for n in range(self.steps):
            z = z + self.mlp(self.norm(z))
            self.last_steps = n + 1
            if n == self.steps - 1:
                break
            h = torch.sigmoid(self.exit(z))
            out = out + remain * h * z
            remain = remain * (1 - h)
            # The halting weights are continuous in z (no threshold), so chunked, whole and stepped
            # runs agree; stopping early changes the output by at most act_eps·|Δz|.
            if not self.training and float(remain.detach().max()) < self.eps:
                break
        return out + remain * z


class ParallelDecoder(nn.Module):
    """One MLP maps (latent, slot, bytes of the current patch so far) to the logits of one byte."""

    def __init__(self, cfg: AgiformerConfig) -> None:
        super().__init__()
        self.patch = cfg.patch
        self.local = nn.Embedding(cfg.vocab_size + 1, cfg.d_local, padding_idx=cfg.vocab_size)
        self.slot = nn.Embedding(cfg.patch, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model + (cfg.patch - 1) * cfg.d_local, cfg.d_model, bias=False)
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, z: Tensor, slot: Tensor, prefix: Tensor) -> Tensor:
        """z [B, T, D], slot [T] in 0..patch-1, prefix [B, T, patch-1] byte ids (pad id where none,
        newest first) -> logits [B, T, V]."""
        B, T, _ = z.shape
        pre = self.local(prefix).reshape(B, T, -1)
        h = self.proj(torch.cat([z, pre], dim=-1)) + self.slot(slot)
        h = h + self.mlp(self.norm1(h))
        return self.head(self.norm2(h))


@register
class Agiformer(Backbone):
    name = "agiformer"
    Config = AgiformerConfig

    def __init__(self, config: AgiformerConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size + 1, c.d_model, padding_idx=c.vocab_size)  # last row: before the start
        self.conv = nn.Conv1d(c.d_model, c.d_model, kernel_size=c.kernel, stride=c.patch)
        self.enc_norm = RMSNorm(c.d_model)
        self.blocks = nn.ModuleList(HybridBlock(c) for _ in range(c.n_layers))
        self.reason = ReasoningBlock(c)
        self.norm = RMSNorm(c.d_model)
        self.decoder = ParallelDecoder(c)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        c, dev = self.config, self.device
        out = {
            "buf": torch.full((batch_size, c.kernel - 1), -1, dtype=torch.long, device=dev),
            "z": torch.zeros(batch_size, c.d_model, device=dev),
        }
        dh = c.d_model // c.n_heads
        for i, blk in enumerate(self.blocks):
            out[f"b{i}.k"], out[f"b{i}.v"] = blk.attn.init_cache(batch_size, dev)
            out[f"b{i}.mem"] = torch.zeros(batch_size, c.n_heads, dh, dh, device=dev)
        return out

    def _latents(self, x: Tensor, tensors: dict[str, Tensor], new: dict[str, Tensor], lpos: int) -> Tensor:
        """Encoded patches x [B, J, D] at latent position ``lpos`` through the trunk -> z [B, J, D]."""
        for i, blk in enumerate(self.blocks):
            x, new[f"b{i}.k"], new[f"b{i}.v"], new[f"b{i}.mem"] = blk(
                x, tensors[f"b{i}.k"], tensors[f"b{i}.v"], tensors[f"b{i}.mem"], lpos
            )
        return self.norm(self.reason(x))

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        B, T = tokens.shape
        P, K, V = c.patch, c.kernel, c.vocab_size
        ext = torch.cat([tensors["buf"], tokens], dim=1)  # (B, K-1+T): ext[:, x] is byte pos-(K-1)+x
        ids = ext.masked_fill(ext < 0, V)
        new: dict[str, Tensor] = {"buf": ext[:, -(K - 1) :]}
        first_end = pos + (P - 1 - pos) % P  # first patch end (≡ P-1 mod P) at or after pos
        n_new = (pos + T - 1 - first_end) // P + 1 if first_end < pos + T else 0  # patches completed here
        zs = tensors["z"][:, None]  # (B, 1, D): the latent decoded before this chunk's first patch end
        if n_new:
            lo = first_end - pos  # ext index where the first completed patch's window starts
            window = ids[:, lo : lo + (n_new - 1) * P + K]  # (B, L)
            x = self.conv(self.embed(window).transpose(1, 2)).transpose(1, 2)  # (B, n_new, D)
            z = self._latents(self.enc_norm(x), tensors, new, pos // P)
            zs = torch.cat([zs, z], dim=1)  # (B, 1+n_new, D)
        else:
            new.update({k: v for k, v in tensors.items() if k not in ("buf", "z")})  # the trunk did not run
        new["z"] = zs[:, -1]
        t = torch.arange(pos, pos + T, device=tokens.device)
        zi = torch.where(t >= first_end, torch.div(t - first_end, P, rounding_mode="floor") + 1, 0)
        slot = (t + 1) % P  # t = P·j + P-1 + slot
        # Bytes of the current patch read so far, newest first: t-m for m < slot, pad otherwise.
        m = torch.arange(P - 1, device=tokens.device)
        idx = (t - pos + K - 1)[:, None] - m[None, :]  # (T, P-1) ext indices; >= K-P >= 0
        prefix = ids[:, idx].masked_fill(~(m[None, :] < slot[:, None]), V)  # (B, T, P-1)
        return self.decoder(zs[:, zi], slot, prefix), new
