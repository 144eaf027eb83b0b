"""Spiralformer (``spiral``): spiral sparse attention, breath-gated blocks, silence-aware masks, Soma and TowerMemory.

    tokens ─► embedding + pos_scale · sinusoidal(absolute position)
      │   breath phase φ_t ∈ {inhale, hold, exhale, pause}: latched from the control tokens (OBS SENSE RESULT
      │   BOS -> inhale, MEM -> hold, THINK SPEAK EXEC -> exhale, WAIT -> pause), carried in the state, and
      │   settable from outside with ``set_breath`` (the phase is an input)
      │
      ├─ for i in 1..n_layers:
      │    SpiralBlock  x + a_i[φ_t] · SpiralAttention(norm x);  x + f_i[φ_t] · SwiGLU(norm x)
      │    │  SpiralAttention: token t attends to t - o for o ∈ {0, 1, 2, 4, ..., max_hop} (powers-of-two
      │    │  hops, causal), + a learned bias per head and hop; silent tokens (PAD, WAIT) are hidden from
      │    │  every other query and attend only to themselves
      │    │  a, f: learned breath weights per layer and phase, from the BreathClock's (1, .5, .25, 0) and
      │    │  (1, 1, 1, 0): a block rests in PAUSE
      │    after block ``n_layers // 2`` (the middle):
      │    Soma    charge c_t ∈ [0,1]^2 (emotional pressure, temporal urgency) = σ(W_s norm h) at each
      │            END_SENSE, latched until the next one (settable with ``set_breath``)
      │    Tower   every ``paint_every`` tokens a painting (W_p · mean of h over the stride) is stored with
      │            its creation charge in one of ``tower_slots`` slots (oldest passed down first)
      │            x + m[φ_t] · W_o Σ_p softmax_p(q_t·k_p/√D + β·resonance(c_t, c_p) - fade·age_p) k_p
      │            resonance = 1 - mean|c_t - c_p| (the seed's), m from (0, 1, 0, 0): recall in HOLD
      │
      └─ norm ─► lm_head (tied to the embedding) ─► logits [B, T, V]

Streaming state (fixed size; floats fp32):
    s{i}.kv              [B, 2, H, max_hop, Dh] keys and values of the last max_hop positions
    spiral.silent        [B, max_hop]          which of them are silent (1.0) or not (0.0)
    breath.phase         [B]                   the current phase (int64, 0..3)
    soma.charge          [B, 2]                the latched charge
    tower.content        [B, P, D]             the paintings; slot n mod P holds painting n
    tower.charge         [B, P, 2]             their creation charges
    tower.acc            [B, D]                the sum of h over the current, unfinished stride

Which painting sits where, and how old it is, follows from the absolute position (painting n is made
at token (n+1)·paint_every - 1), so no counters are stored and any chunking gives the same tower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Backbone, State, register
from models.layers import RMSNorm, SinusoidalTable, SwiGLU, rms, sinusoidal, swiglu
from models.tokenizer import ID, VOCAB_SIZE

PHASES = ("inhale", "hold", "exhale", "pause")
# Control tokens that open a phase; every other token leaves the phase as it was.
PHASE_OF_CONTROL = {
    "BOS": 0, "OBS": 0, "SENSE": 0, "RESULT": 0,  # taking in
    "MEM": 1,  # recall
    "THINK": 2, "SPEAK": 2, "EXEC": 2,  # acting
    "WAIT": 3,  # rest
}
SILENT = ("PAD", "WAIT")
CHARGE_DIM = 2  # the seed's FieldCharge: emotional pressure, temporal urgency
# BreathClock.weight_for_phase of the seed, as initial values of the learned breath weights.
ATTN_BREATH = (1.0, 0.5, 0.25, 0.0)
MLP_BREATH = (1.0, 1.0, 1.0, 0.0)
TOWER_BREATH = (0.0, 1.0, 0.0, 0.0)  # the seed consults TowerMemory in the hold phase only
_QUERY_BLOCK = 256  # queries per gather in spiral attention: bounds the [T, hops, D] working set
_PREFILL_CHUNK = 1024


@dataclass
class SpiralConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_hop: int = 512  # longest hop, a power of two; the KV cache keeps this many positions
    tower_slots: int = 15  # the seed's max_painters
    paint_every: int = 64  # tokens per painting

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, d_model and n_layers must be >= 1")
        if self.vocab_size <= max(ID.values()):
            raise ValueError(f"vocab_size {self.vocab_size} must hold the control tokens (ids up to {max(ID.values())})")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.max_hop < 1 or self.max_hop & (self.max_hop - 1):
            raise ValueError(f"max_hop must be a power of two >= 1, got {self.max_hop}")
        if self.tower_slots < 1 or self.paint_every < 1:
            raise ValueError(f"tower_slots and paint_every must be >= 1, got {self.tower_slots}, {self.paint_every}")

    @property
    def hops(self) -> list[int]:
        return [0] + [1 << k for k in range(self.max_hop.bit_length())]

    @property
    def tower_after(self) -> int:
        return max(0, self.n_layers // 2 - 1)


def latch(values: Tensor, is_set: Tensor, carried: Tensor) -> Tensor:
    """Per position, the value at the last position <= t where ``is_set``, else ``carried``.
    values [B, T, ...], is_set [B, T] bool, carried [B, ...] -> [B, T, ...]."""
    B, T = is_set.shape
    idx = torch.where(is_set, torch.arange(T, device=is_set.device), -1).cummax(dim=1).values  # (B, T)
    picked = values.gather(1, idx.clamp(min=0).view(B, T, *[1] * (values.dim() - 2)).expand_as(values))
    before = (idx < 0).view(B, T, *[1] * (values.dim() - 2))
    return torch.where(before, carried[:, None].expand_as(values), picked)


class SpiralAttention(nn.Module):
    """Causal multi-head attention over the powers-of-two hops; a KV cache of the last max_hop positions."""

    def __init__(self, cfg: SpiralConfig) -> None:
        super().__init__()
        self.h, self.dh, self.w = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.max_hop
        self.register_buffer("hops", torch.tensor(cfg.hops), persistent=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.hop_bias = nn.Parameter(torch.zeros(cfg.n_heads, len(cfg.hops)))  # which distances each head favours
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cache: Tensor, silent: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """x [B, T, D] at absolute ``pos``, cache [B, 2, H, W, Dh] (keys, values of positions pos-W .. pos-1),
        silent [B, W + T]: the cached positions' flags then the chunk's -> (y [B, T, D], new cache)."""
        B, T, D = x.shape
        W, H, Dh = self.w, self.h, self.dh
        q, kv = F.linear(x, self.qkv.weight).view(B, T, 3, H, Dh).permute(0, 2, 3, 1, 4).split([1, 2], dim=1)
        kv = torch.cat([cache, kv], dim=3)  # (B, 2, H, W+T, Dh)
        outs = []
        for s in range(0, T, _QUERY_BLOCK):
            t = torch.arange(s, min(T, s + _QUERY_BLOCK), device=x.device)
            idx = W + t[:, None] - self.hops[None, :]  # (Tb, n_hops) index into kv
            ks, vs = kv[:, :, :, idx].unbind(1)  # each (B, H, Tb, n_hops, Dh)
            scores = (q[:, 0, :, t, None, :] * ks).sum(-1) / math.sqrt(Dh) + self.hop_bias[:, None, :]  # (B, H, Tb, n_hops)
            hidden = (pos + idx - W < 0)[None] | silent[:, idx] | silent[:, W + t, None]  # before the stream, or silence
            hidden[..., 0] = False  # a token always sees itself
            a = scores.masked_fill(hidden[:, None], float("-inf")).softmax(-1)
            outs.append((a[..., None] * vs).sum(-2))  # (B, H, Tb, Dh)
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, D)
        return F.linear(y, self.out.weight), kv[:, :, :, -W:].contiguous()

    def step(self, x: Tensor, cache: Tensor, silent: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """One token x [B, D]; silent [B, W + 1] as in ``forward``. The same arithmetic in fewer ops."""
        B, D = x.shape
        W, H, Dh = self.w, self.h, self.dh
        q, kv = F.linear(x, self.qkv.weight).view(B, 3, H, 1, Dh).split([1, 2], dim=1)  # (B, 1|2, H, 1, Dh)
        idx = W - self.hops  # (n_hops,) into [cache, token]: hop o at W - o, the token itself at W
        ks, vs = torch.cat([kv, cache[:, :, :, idx[1:]]], dim=3).unbind(1)  # each (B, H, n_hops, Dh), hop order
        scores = (q[:, 0] * ks).sum(-1) / math.sqrt(Dh) + self.hop_bias  # (B, H, n_hops)
        hidden = (pos + idx - W < 0)[None] | silent[:, idx] | silent[:, W, None]  # (B, n_hops)
        hidden[:, 0] = False
        a = scores.masked_fill(hidden[:, None], float("-inf")).softmax(-1)
        y = (a[..., None] * vs).sum(-2).reshape(B, D)
        return F.linear(y, self.out.weight), torch.cat([cache[:, :, :, 1:], kv], dim=3)


class SpiralBlock(nn.Module):
    def __init__(self, cfg: SpiralConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = SpiralAttention(cfg)
        self.mlp = SwiGLU(cfg.d_model)
        self.breath = nn.Parameter(torch.tensor([ATTN_BREATH, MLP_BREATH]))  # (2, phases): attention, MLP


class Tower(nn.Module):
    """Soma (the felt charge) and TowerMemory (paintings recalled by resonance)."""

    def __init__(self, cfg: SpiralConfig) -> None:
        super().__init__()
        D, self.P, self.S = cfg.d_model, cfg.tower_slots, cfg.paint_every
        self.norm = RMSNorm(D)
        self.soma = nn.Linear(D, CHARGE_DIM)
        self.paint = nn.Linear(D, D, bias=False)
        self.query = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.resonance_gain = nn.Parameter(torch.tensor(2.0))  # β
        self.fade_logit = nn.Parameter(torch.tensor(-3.0))  # fade per painting of age: softplus, ~0.05
        self.null_score = nn.Parameter(torch.tensor(0.0))  # "nothing resonates": a sink with no content
        self.breath = nn.Parameter(torch.tensor(TOWER_BREATH))

    def _recall(self, h: Tensor, charge: Tensor, content: Tensor, made: Tensor, visible: Tensor, age: Tensor, phase: Tensor) -> Tensor:
        """The breath-weighted recall for h [B, T, D] with charges [B, T, 2], over paintings content [B, N, D]
        made at charges [B, N, 2]; visible [T, N] (or [B, N] for one token), age [T|B, N] in paintings."""
        D = h.shape[-1]
        resonance = 1 - (charge[:, :, None] - made[:, None]).abs().mean(-1)  # (B, T, N)
        scores = torch.einsum("btd,bnd->btn", F.linear(h, self.query.weight), content) / math.sqrt(D)
        scores = scores + self.resonance_gain * resonance - F.softplus(self.fade_logit) * age.clamp(min=0).float()
        scores = torch.cat([scores.masked_fill(~visible, float("-inf")), self.null_score.expand(*scores.shape[:2], 1)], dim=-1)
        read = torch.einsum("btn,bnd->btd", scores.softmax(-1)[..., :-1], content)
        return self.breath[phase][..., None] * F.linear(read, self.out.weight)

    def step(self, x: Tensor, token: Tensor, phase: Tensor, t: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One token x [B, D]: ``forward``'s arithmetic with the painting (if this token ends one) done directly."""
        P, S = self.P, self.S
        h = rms(self.norm, x)
        charge = torch.where((token == ID["END_SENSE"])[:, None], torch.sigmoid(self.soma(h)), t["soma.charge"])
        acc, content, made = t["tower.acc"] + h, t["tower.content"], t["tower.charge"]
        if (pos + 1) % S == 0:  # this token ends painting pos // S
            slot = torch.tensor([(pos // S) % P], device=x.device)
            content = content.index_copy(1, slot, F.linear(acc / S, self.paint.weight)[:, None])
            made = made.index_copy(1, slot, charge[:, None])
            acc = torch.zeros_like(acc)
        count = (pos + 1) // S
        n = count - 1 - (count - 1 - torch.arange(P, device=x.device)) % P  # what each slot holds
        x = x + self._recall(h[:, None], charge[:, None], content, made, (n >= 0)[None], (count - 1 - n)[None], phase[:, None])[:, 0]
        return x, {"soma.charge": charge, "tower.content": content, "tower.charge": made, "tower.acc": acc}

    def forward(self, x: Tensor, tokens: Tensor, phase: Tensor, t: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, D] (the hidden state at the tower), phase [B, T] -> (x + recall, new soma/tower tensors)."""
        B, T, D = x.shape
        P, S, dev = self.P, self.S, x.device
        h = rms(self.norm, x)
        charge = latch(torch.sigmoid(self.soma(h)), tokens == ID["END_SENSE"], t["soma.charge"])  # (B, T, 2)

        # Paintings finished in this chunk: painting n ends at token (n+1)·S - 1.
        count0, count1 = pos // S, (pos + T) // S
        n_new = count1 - count0
        seg = torch.div(torch.arange(pos, pos + T, device=dev), S, rounding_mode="floor") - count0  # (T,) stride index
        sums = x.new_zeros(B, n_new + 1, D).index_add(1, seg, h)
        sums = torch.cat([sums[:, :1] + t["tower.acc"][:, None], sums[:, 1:]], dim=1)
        ends = (torch.arange(count0, count1, device=dev) + 1) * S - 1 - pos  # (n_new,) chunk index of each end
        new_content = F.linear(sums[:, :n_new] / S, self.paint.weight)  # (B, n_new, D)
        new_charge = charge[:, ends]  # (B, n_new, 2)

        # Candidates: the P carried slots (slot p holds painting n_p, the last n < count0 with n ≡ p mod P)
        # and the new paintings. Painting n is visible to token t while count(t) - P <= n < count(t).
        p = torch.arange(P, device=dev)
        n_old = count0 - 1 - (count0 - 1 - p) % P  # (P,), negative: never painted
        n_all = torch.cat([n_old, torch.arange(count0, count1, device=dev)])  # (P + n_new,)
        content = torch.cat([t["tower.content"], new_content], dim=1)
        made_charge = torch.cat([t["tower.charge"], new_charge], dim=1)
        count = torch.div(torch.arange(pos + 1, pos + T + 1, device=dev), S, rounding_mode="floor")[:, None]  # (T, 1)
        visible = (n_all >= 0) & (n_all < count) & (n_all >= count - P)  # (T, P + n_new)
        x = x + self._recall(h, charge, content, made_charge, visible, count - 1 - n_all, phase)

        keep = min(n_new, P)  # the newest paintings overwrite their slots
        slots = torch.arange(count1 - keep, count1, device=dev) % P
        new = {
            "soma.charge": charge[:, -1],
            "tower.content": t["tower.content"].index_copy(1, slots, new_content[:, n_new - keep :]),
            "tower.charge": t["tower.charge"].index_copy(1, slots, new_charge[:, n_new - keep :]),
            "tower.acc": sums[:, n_new],
        }
        return x, new


@register
class Spiral(Backbone):
    """Spiralformer. See the module docstring for the block tree and the state layout."""

    name = "spiral"
    Config = SpiralConfig

    def __init__(self, config: SpiralConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_scale = nn.Parameter(torch.tensor(0.02))
        self.blocks = nn.ModuleList(SpiralBlock(c) for _ in range(c.n_layers))
        self.tower = Tower(c)
        self.norm = RMSNorm(c.d_model)
        phase_of = torch.full((c.vocab_size,), -1, dtype=torch.long)
        for name, ph in PHASE_OF_CONTROL.items():
            phase_of[ID[name]] = ph
        silent = torch.zeros(c.vocab_size, dtype=torch.bool)
        silent[[ID[n] for n in SILENT]] = True
        self.register_buffer("phase_of", phase_of, persistent=False)
        self.register_buffer("is_silent", silent, persistent=False)
        self._position = SinusoidalTable(c.d_model)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        c, dev, B = self.config, self.device, batch_size
        H, Dh = c.n_heads, c.d_model // c.n_heads
        out: dict[str, Tensor] = {}
        for i in range(c.n_layers):
            out[f"s{i}.kv"] = torch.zeros(B, 2, H, c.max_hop, Dh, device=dev)
        out["spiral.silent"] = torch.zeros(B, c.max_hop, device=dev)
        out["breath.phase"] = torch.zeros(B, dtype=torch.long, device=dev)  # a stream starts inhaling
        out["soma.charge"] = torch.zeros(B, CHARGE_DIM, device=dev)  # light and spacious
        out["tower.content"] = torch.zeros(B, c.tower_slots, c.d_model, device=dev)
        out["tower.charge"] = torch.zeros(B, c.tower_slots, CHARGE_DIM, device=dev)
        out["tower.acc"] = torch.zeros(B, c.d_model, device=dev)
        return out

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        outs = []
        for s in range(0, tokens.shape[1], _PREFILL_CHUNK):
            logits, tensors = self._chunk(tokens[:, s : s + _PREFILL_CHUNK], tensors, pos + s)
            outs.append(logits)
        return torch.cat(outs, dim=1), tensors

    def _chunk(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        T = tokens.shape[1]
        ph = self.phase_of[tokens]  # (B, T), -1: no change
        phase = latch(ph, ph >= 0, tensors["breath.phase"])  # (B, T)
        silent = torch.cat([tensors["spiral.silent"] > 0, self.is_silent[tokens]], dim=1)  # (B, W + T) bool
        x = self.embed(tokens) + self.pos_scale * sinusoidal(torch.arange(pos, pos + T), c.d_model).to(tokens.device)
        new: dict[str, Tensor] = {"breath.phase": phase[:, -1], "spiral.silent": silent[:, -c.max_hop :].float()}
        for i, blk in enumerate(self.blocks):
            y, new[f"s{i}.kv"] = blk.attn(rms(blk.norm1, x), tensors[f"s{i}.kv"], silent, pos)
            w = blk.breath[:, phase]  # (2, B, T)
            x = x + w[0, ..., None] * y
            x = x + w[1, ..., None] * swiglu(blk.mlp, rms(blk.norm2, x))
            if i == c.tower_after:
                x, tower_state = self.tower(x, tokens, phase, tensors, pos)
                new.update(tower_state)
        return F.linear(rms(self.norm, x), self.embed.weight), new

    def _step(self, token: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One token through each part's direct path: the same arithmetic as ``_chunk``, fewer ops."""
        c = self.config
        ph = self.phase_of[token]
        phase = torch.where(ph >= 0, ph, tensors["breath.phase"])  # (B,)
        silent = torch.cat([tensors["spiral.silent"] > 0, self.is_silent[token][:, None]], dim=1)  # (B, W + 1)
        x = self.embed(token) + self.pos_scale * self._position(pos, token.device)  # (B, D)
        new: dict[str, Tensor] = {"breath.phase": phase, "spiral.silent": silent[:, 1:].float()}
        for i, blk in enumerate(self.blocks):
            y, new[f"s{i}.kv"] = blk.attn.step(rms(blk.norm1, x), tensors[f"s{i}.kv"], silent, pos)
            w = blk.breath[:, phase]  # (2, B)
            x = x + w[0, :, None] * y
            x = x + w[1, :, None] * swiglu(blk.mlp, rms(blk.norm2, x))
            if i == c.tower_after:
                x, tower_state = self.tower.step(x, token, phase, tensors, pos)
                new.update(tower_state)
        return F.linear(rms(self.norm, x), self.embed.weight), new


def set_breath(state: State, phase: str | None = None, charge: Sequence[float] | None = None) -> State:
    """A copy of a ``spiral`` state with the breath phase and/or the Soma charge set from outside (the
    daemon's BreathClock and Soma), in force until the stream's own controls change them."""
    if state.meta.architecture != Spiral.name:
        raise ValueError(f"set_breath takes a spiral state, got one for {state.meta.architecture!r}")
    out = State(dict(state), state.meta)
    if phase is not None:
        if phase not in PHASES:
            raise ValueError(f"unknown breath phase {phase!r}; one of {PHASES}")
        out["breath.phase"] = torch.full_like(state["breath.phase"], PHASES.index(phase))
    if charge is not None:
        values = torch.tensor([float(v) for v in charge], dtype=torch.float32, device=state["soma.charge"].device)
        if values.shape != (CHARGE_DIM,) or not ((values >= 0) & (values <= 1)).all():
            raise ValueError(f"charge must be {CHARGE_DIM} numbers in [0, 1] (pressure, urgency), got {list(charge)}")
        out["soma.charge"] = values.expand_as(state["soma.charge"]).clone()
    return out
