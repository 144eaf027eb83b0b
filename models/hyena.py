"""SpectralGPT (``hyena``): Hyena operators, sliding-window attention and residual memory blocks.

    tokens ─► embedding + pos_scale · sinusoidal(absolute position)
      │
      ├─ for i in 1..n_layers:
      │    HyenaBlock     x + Hyena(norm x);  x + SwiGLU(norm x)
      │    │  Hyena (order N):  in_proj D→(N+1)D ─► short depthwise causal conv (kernel K)
      │    │                    ─► split x0, x1..x(N-1), v
      │    │                    ─► v = longconv_o(v · x_(N-o)) for o = 1..N-1  (implicit filters, length L)
      │    │                    ─► out_proj(v · x0)
      │    │  implicit filter:  positional features of t∈[0,1] ─► Linear ─► sin ─► Linear ─► sin ─► Linear
      │    │                    · exp(-|decay_c| t)    (fixed per weights: cached at inference)
      │    MemoryBlock    after every ``mem_every`` layers: x + W_o(read(M_t));  M_t = λ M_(t-1) + (1-λ) a_t v_tᵀ
      │    AttentionBlock after every ``attn_every`` layers: x + SWA(norm x);  x + SwiGLU(norm x)
      │
      └─ norm ─► lm_head (tied to the embedding) ─► logits [B, T, V]

Streaming state (fixed size, every tensor fp32):
    h{i}.short  [B, (N+1)D, K-1]   the short conv's last K-1 inputs
    h{i}.long   [B, N-1, D, L-1]   each long conv's last L-1 inputs: exactly what a length-L filter sees
    m{i}.mem    [B, S, D]          memory slots
    a{i}.k/.v   [B, H, W, Dh]      sliding-window KV cache (layers.SlidingWindowAttention)

Prefill goes through in chunks of <= 1024 tokens; each long conv convolves [history, chunk] with one
fp32 FFT of size ~(L + T): O(T log T) per chunk, linear in the prompt overall, never O(T²). Chunks of
<= 16 tokens use direct windows. ``_step`` is a direct path: one dot product over the L-long history
per channel, no FFT, and fused functional calls (decoding pays per op). The filters depend only on
weights, so at inference they (and their spectra) are cached until a weight changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Backbone, register
from models.layers import RMSNorm, SlidingWindowAttention, SwiGLU, rms, sinusoidal, swiglu
from models.tokenizer import VOCAB_SIZE

# Chunks up to this length use the direct (windowed dot product) long conv; longer ones the FFT.
_DIRECT_MAX = 16
# Memory recurrence block: λ >= _MIN_DECAY keeps λ^±_MEM_BLOCK far inside fp32 range (0.8^-256 ≈ 5e24).
_MEM_BLOCK = 256
_MIN_DECAY = 0.8
# Prompts longer than this are processed chunk by chunk (see Hyena._forward).
_PREFILL_CHUNK = 1024
# Filter spectra are cached per FFT size up to this size (bounded memory: a few MB per layer).
_MAX_CACHED_FFT = 8192


@dataclass
class HyenaConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 192
    n_layers: int = 6  # Hyena blocks; attention and memory blocks come on top
    order: int = 2  # Hyena order N: N-1 long convolutions per operator
    filter_len: int = 256  # L: long-conv filter length, and the history each conv keeps in the state
    short_kernel: int = 3  # K: depthwise causal conv on the projections
    filter_emb: int = 9  # positional features fed to the filter MLP (t + (emb-1)/2 sin/cos pairs)
    filter_hidden: int = 32
    filter_freq: float = 1.0  # initial frequency of the sine activations
    attn_every: int = 6  # a sliding-window attention block after every this many Hyena blocks (0: none)
    n_heads: int = 4
    window: int = 256
    mem_every: int = 3  # a memory block after every this many Hyena blocks (0: none)
    mem_slots: int = 8

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, d_model and n_layers must be >= 1")
        if self.order < 2:
            raise ValueError(f"order must be >= 2, got {self.order}")
        if self.filter_len < 2 or self.short_kernel < 2:
            raise ValueError("filter_len and short_kernel must be >= 2 (their histories live in the state)")
        if self.filter_emb < 3 or self.filter_emb % 2 == 0:
            raise ValueError(f"filter_emb must be odd and >= 3, got {self.filter_emb}")
        if self.attn_every and (self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2):
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.attn_every < 0 or self.mem_every < 0 or self.window < 1 or self.mem_slots < 1:
            raise ValueError("attn_every, mem_every must be >= 0; window, mem_slots >= 1")


def _fft_size(n: int) -> int:
    """Smallest 2^a·{1,3,5} >= n: pocketfft is fastest on such sizes, and it wastes < 34% over n."""
    return min(m << max(0, math.ceil(math.log2(n / m))) for m in (1, 3, 5))


class Sin(nn.Module):
    """sin(w · x) with a learnable frequency per unit (the implicit filter's activation)."""

    def __init__(self, dim: int, w: float) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Long filters h [C, L] from a positional MLP with sine activations and an exponential decay
    window. They depend on the relative position inside the filter only, so they are fixed per weights."""

    def __init__(self, channels: int, cfg: HyenaConfig) -> None:
        super().__init__()
        L, bands = cfg.filter_len, (cfg.filter_emb - 1) // 2
        t = torch.linspace(0, 1, L)[:, None]  # (L, 1)
        f = torch.linspace(1e-4, bands - 1, bands)[None, :]  # (1, bands)
        w = 2 * math.pi * torch.arange(L, dtype=torch.float32)[:, None] / L
        self.register_buffer("z", torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1), persistent=False)  # (L, E)
        # Exponential windows spread over channels: each falls to 1e-2 somewhere between 30% (fast)
        # and 150% (slow) of the filter length, so some channels stay local and others reach far.
        fast, slow = math.log(1e-2) / 0.3, math.log(1e-2) / 1.5
        self.register_buffer("window", torch.exp(-t * torch.linspace(slow, fast, channels).abs()[None, :]), persistent=False)  # (L, C)
        H = cfg.filter_hidden
        self.mlp = nn.Sequential(
            nn.Linear(cfg.filter_emb, H), Sin(H, cfg.filter_freq), nn.Linear(H, H), Sin(H, cfg.filter_freq), nn.Linear(H, channels, bias=False)
        )

    def forward(self) -> Tensor:
        return (self.mlp(self.z) * self.window).t().contiguous()  # (C, L)


class HyenaOperator(nn.Module):
    def __init__(self, cfg: HyenaConfig) -> None:
        super().__init__()
        D, N, K = cfg.d_model, cfg.order, cfg.short_kernel
        self.d, self.n, self.k, self.L = D, N, K, cfg.filter_len
        self.in_proj = nn.Linear(D, (N + 1) * D)
        self.short_w = nn.Parameter(torch.randn((N + 1) * D, K) / math.sqrt(K))  # depthwise, oldest tap first
        self.filter = ImplicitFilter((N - 1) * D, cfg)
        self.skip = nn.Parameter(torch.randn(N - 1, D))  # per-channel direct term of each long conv
        self.out_proj = nn.Linear(D, D)
        self._cache: tuple[tuple[int, ...], Tensor, dict[tuple[str, int], Tensor]] | None = None

    def filters(self) -> tuple[Tensor, dict[tuple[str, int], Tensor]]:
        """h [N-1, D, L] (fp32) and a dict of derived tensors (rffts by FFT size, the flipped filter
        for decoding). Recomputed whenever autograd is on (training); otherwise cached until a weight
        changes (versions bump on optimizer steps and load_state_dict) or the module moves."""
        params = list(self.filter.parameters())
        key = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
        if torch.is_grad_enabled() or self._cache is None or self._cache[0] != key:
            h = self.filter().float().view(self.n - 1, self.d, self.L)
            if torch.is_grad_enabled():
                return h, {}
            self._cache = (key, h, {})
        return self._cache[1], self._cache[2]

    def step(self, x: Tensor, short: Tensor, long: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token, x [B, D] -> (y [B, D], short, long): the forward's arithmetic, fewest ops."""
        h, derived = self.filters()
        hflip = derived.get(("flip", 0))
        if hflip is None:
            hflip = h.flip(-1)  # (N-1, D, L): newest tap last, like the history
            if not torch.is_grad_enabled():
                derived[("flip", 0)] = hflip
        u = torch.cat([short, F.linear(x, self.in_proj.weight, self.in_proj.bias)[..., None]], dim=-1)  # (B, (N+1)D, K)
        x0, *xs, v = torch.linalg.vecdot(u, self.short_w).split(self.d, dim=-1)  # each (B, D)
        hists = []
        for o, xi in enumerate(reversed(xs)):
            v = v * xi
            full = torch.cat([long[:, o], v[..., None]], dim=-1)  # (B, D, L)
            v = torch.addcmul(torch.linalg.vecdot(full, hflip[o]), self.skip[o], v)
            hists.append(full[..., 1:])
        long = hists[0][:, None] if len(hists) == 1 else torch.stack(hists, dim=1)  # order 2: a view, no copy
        return F.linear(v * x0, self.out_proj.weight, self.out_proj.bias), u[..., 1:], long

    def forward(self, x: Tensor, short: Tensor, long: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D], short [B, (N+1)D, K-1], long [B, N-1, D, L-1] -> (y [B, T, D], short, long)."""
        B, T, D = x.shape
        h, derived = self.filters()
        u = torch.cat([short, self.in_proj(x).transpose(1, 2)], dim=-1)  # (B, (N+1)D, K-1+T)
        # Depthwise causal conv as K shifted multiply-adds: faster on CPU than conv1d for small K.
        z = u[..., : T] * self.short_w[:, :1]  # (B, (N+1)D, T)
        for j in range(1, self.k):
            z = torch.addcmul(z, u[..., j : j + T], self.short_w[:, j : j + 1])
        new_short = u[..., -(self.k - 1) :].contiguous()  # a copy: a view would pin the whole chunk
        x0, *xs, v = z.split(D, dim=1)  # each (B, D, T)
        hists = []
        for o, xi in enumerate(reversed(xs)):
            v, hist = self._long_conv(v * xi, long[:, o], h, derived, o)
            hists.append(hist)
        y = (v * x0).transpose(1, 2)  # (B, T, D)
        return self.out_proj(y), new_short, torch.stack(hists, dim=1)

    def _long_conv(self, v: Tensor, hist: Tensor, h: Tensor, derived: dict[tuple[str, int], Tensor], o: int) -> tuple[Tensor, Tensor]:
        """Causal conv of v [B, D, T] with filter h[o] [D, L] given the last L-1 inputs, in fp32."""
        T, L = v.shape[-1], self.L
        full = torch.cat([hist, v.float()], dim=-1)  # (B, D, L-1+T)
        if T <= _DIRECT_MAX:
            y = torch.einsum("bdtl,dl->bdt", full.unfold(-1, L, 1), h[o].flip(-1))  # windows (B, D, T, L)
        else:
            # Circular conv of size n >= L-1+T: outputs at index >= L-1 never wrap, and those are the chunk's.
            n = _fft_size(L - 1 + T)
            hf = derived.get(("rfft", n))
            if hf is None:
                hf = torch.fft.rfft(h, n=n)  # (N-1, D, n//2+1)
                if not torch.is_grad_enabled() and n <= _MAX_CACHED_FFT:
                    derived[("rfft", n)] = hf
            y = torch.fft.irfft(torch.fft.rfft(full, n=n) * hf[o], n=n)[..., L - 1 : L - 1 + T]
        return torch.addcmul(y, self.skip[o][:, None], v).to(v.dtype), full[..., -(L - 1) :]


class MemoryBlock(nn.Module):
    """Residual read/write of S persistent memory slots carried in the state.

    Write: M_t[s] = λ_s M_(t-1)[s] + (1 - λ_s) a_t[s] v_t, with a_t = softmax over slots (where to
    write) and λ_s a learned per-slot persistence in [0.8, 1). Read: r_t = Σ_s q_t[s] M_t[s], added
    back through W_o. The read is linear in M, so a chunk is computed block by block with matmuls.
    """

    def __init__(self, cfg: HyenaConfig) -> None:
        super().__init__()
        D, S = cfg.d_model, cfg.mem_slots
        self.norm = RMSNorm(D)
        self.proj = nn.Linear(D, 2 * S + D)  # write address, read address, value
        self.out = nn.Linear(D, D)
        # Time constants τ (λ = 1 - 1/τ) from ~6 to ~5000 tokens, log-spaced over the slots.
        lam = 1 - 1 / torch.logspace(math.log10(6), math.log10(5000), S)
        self.decay_logit = nn.Parameter(torch.logit((lam - _MIN_DECAY) / (1 - _MIN_DECAY)))
        self.s = S

    def step(self, x: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        """One token, x [B, D], mem [B, S, D] -> (x + read, mem)."""
        a, q, v = self.proj(rms(self.norm, x)).float().split([self.s, self.s, x.shape[-1]], dim=-1)  # (B, S), (B, S), (B, D)
        lam = self.decay()
        mem = torch.addcmul(lam[:, None] * mem, ((1 - lam) * a.softmax(-1))[..., None], v[:, None, :])  # (B, S, D)
        return x + self.out(torch.bmm(q.softmax(-1)[:, None], mem)[:, 0].to(x.dtype)), mem

    def decay(self) -> Tensor:
        return _MIN_DECAY + (1 - _MIN_DECAY) * torch.sigmoid(self.decay_logit.float())  # λ (S,)

    def forward(self, x: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D], mem [B, S, D] -> (x + read, mem after the chunk)."""
        B, T, D = x.shape
        S = self.s
        a, q, v = self.proj(rms(self.norm, x)).float().split([S, S, D], dim=-1)
        a, q = a.softmax(-1), q.softmax(-1)  # (B, T, S)
        lam = self.decay()
        reads = []
        for s in range(0, T, _MEM_BLOCK):
            # Within a block of Tb tokens, with M the memory before it:
            #   r_t = Σ_k q_t[k] λ_k^(t+1) M[k] + Σ_(s<=t) A[t, s] v_s,
            #   A[t, s] = Σ_k (q_t[k] λ_k^t) ((1 - λ_k) a_s[k] λ_k^-s)
            # two matmuls instead of materialising M_t [Tb, S, D] for every t.
            qb, ab, vb = q[:, s : s + _MEM_BLOCK], a[:, s : s + _MEM_BLOCK], v[:, s : s + _MEM_BLOCK]
            Tb = qb.shape[1]
            t = torch.arange(Tb, device=x.device, dtype=torch.float32)[:, None]  # (Tb, 1)
            up, down = lam**t, lam ** -t  # (Tb, S): λ^t, and λ^-t <= 0.8^-256
            A = torch.bmm(qb * up, (ab * ((1 - lam) * down)).transpose(1, 2)).tril()  # (B, Tb, Tb)
            reads.append(torch.bmm(A, vb) + torch.bmm(qb * (up * lam), mem))  # (B, Tb, D)
            tail = (ab * ((1 - lam) * lam ** (Tb - 1 - t))).transpose(1, 2)  # (B, S, Tb): λ^(Tb-1-s)
            mem = (lam**Tb)[:, None] * mem + torch.bmm(tail, vb)  # (B, S, D)
        return x + self.out(torch.cat(reads, dim=1).to(x.dtype)), mem


class HyenaBlock(nn.Module):
    def __init__(self, cfg: HyenaConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.op = HyenaOperator(cfg)
        self.mlp = SwiGLU(cfg.d_model)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: HyenaConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = SlidingWindowAttention(cfg.d_model, cfg.n_heads, cfg.window)
        self.mlp = SwiGLU(cfg.d_model)


@register
class Hyena(Backbone):
    """SpectralGPT. See the module docstring for the block tree and the state layout."""

    name = "hyena"
    Config = HyenaConfig

    def __init__(self, config: HyenaConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_scale = nn.Parameter(torch.tensor(0.02))
        self.blocks = nn.ModuleDict()
        # Layer plan: names in order, h{i} then m{i} then a{i}; the names key the state too.
        for i in range(c.n_layers):
            self.blocks[f"h{i}"] = HyenaBlock(c)
            if c.mem_every and (i + 1) % c.mem_every == 0:
                self.blocks[f"m{i}"] = MemoryBlock(c)
            if c.attn_every and (i + 1) % c.attn_every == 0:
                self.blocks[f"a{i}"] = AttentionBlock(c)
        self.norm = RMSNorm(c.d_model)
        self._pos_table: tuple[int, Tensor] = (0, torch.empty(0, c.d_model))

    def _position(self, pos: int, device: torch.device) -> Tensor:
        """sinusoidal(pos) [1, D] for decoding, from a table of the next 256 positions (the same
        float64 arithmetic per position as a whole-chunk call, so bit-identical)."""
        start, table = self._pos_table
        if not start <= pos < start + table.shape[0] or table.device != device:
            start, table = pos, sinusoidal(torch.arange(pos, pos + 256), self.config.d_model).to(device)
            self._pos_table = (start, table)
        return table[pos - start][None]

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        c, dev, B = self.config, self.device, batch_size
        out: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            if isinstance(blk, HyenaBlock):
                out[f"{name}.short"] = torch.zeros(B, (c.order + 1) * c.d_model, c.short_kernel - 1, device=dev)
                out[f"{name}.long"] = torch.zeros(B, c.order - 1, c.d_model, c.filter_len - 1, device=dev)
            elif isinstance(blk, MemoryBlock):
                out[f"{name}.mem"] = torch.zeros(B, c.mem_slots, c.d_model, device=dev)
            else:
                assert isinstance(blk, AttentionBlock)
                out[f"{name}.k"], out[f"{name}.v"] = blk.attn.init_cache(B, dev)
        return out

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        # Long prompts go through in chunks, each carrying the state to the next (exact): activations
        # of one chunk stay in cache, and the cost per token stays flat instead of rising with T.
        if tokens.shape[1] <= _PREFILL_CHUNK:
            return self._forward_chunk(tokens, tensors, pos)
        outs = []
        for s in range(0, tokens.shape[1], _PREFILL_CHUNK):
            logits, tensors = self._forward_chunk(tokens[:, s : s + _PREFILL_CHUNK], tensors, pos + s)
            outs.append(logits)
        return torch.cat(outs, dim=1), tensors

    def _forward_chunk(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        T = tokens.shape[1]
        positions = torch.arange(pos, pos + T)
        x = self.embed(tokens) + self.pos_scale * sinusoidal(positions, self.config.d_model).to(tokens.device)  # (B, T, D)
        new: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            if isinstance(blk, HyenaBlock):
                y, new[f"{name}.short"], new[f"{name}.long"] = blk.op(rms(blk.norm1, x), tensors[f"{name}.short"], tensors[f"{name}.long"])
                x = x + y
                x = x + blk.mlp(rms(blk.norm2, x))
            elif isinstance(blk, MemoryBlock):
                x, new[f"{name}.mem"] = blk(x, tensors[f"{name}.mem"])
            else:
                y, new[f"{name}.k"], new[f"{name}.v"] = blk.attn(rms(blk.norm1, x), tensors[f"{name}.k"], tensors[f"{name}.v"], pos)
                x = x + y
                x = x + blk.mlp(rms(blk.norm2, x))
        return F.linear(rms(self.norm, x), self.embed.weight), new  # tied head: (B, T, V)

    def _step(self, token: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The same arithmetic as ``_forward`` on one token, through each block's direct path."""
        x = self.embed(token) + self.pos_scale * self._position(pos, token.device)  # (B, D)
        new: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            if isinstance(blk, HyenaBlock):
                y, new[f"{name}.short"], new[f"{name}.long"] = blk.op.step(rms(blk.norm1, x), tensors[f"{name}.short"], tensors[f"{name}.long"])
                x = x + y
                x = x + swiglu(blk.mlp, rms(blk.norm2, x))
            elif isinstance(blk, MemoryBlock):
                x, new[f"{name}.mem"] = blk.step(x, tensors[f"{name}.mem"])
            else:
                y, new[f"{name}.k"], new[f"{name}.v"] = blk.attn.step(rms(blk.norm1, x), tensors[f"{name}.k"], tensors[f"{name}.v"], pos)
                x = x + y
                x = x + swiglu(blk.mlp, rms(blk.norm2, x))
        return F.linear(rms(self.norm, x), self.embed.weight), new  # (B, V)
