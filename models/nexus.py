"""The Nexus Transformer (``nexus``): sliding-window attention with RoPE, and a Recurrent Sparse
Memory (models.rsm) for what has left the window.

    tokens ─► embedding
      │  LexicalLane (token-only, one per model): lex_t = the token that followed the n-gram ending at
      │                                          t when it was last written, or -1
      ├─ for i in 1..n_layers:
      │    Block    x + SWA(norm x)      causal, RoPE at absolute positions, the last ``window`` tokens
      │             x + SwiGLU(norm x)
      │    RSM      after every ``rsm_every`` blocks: x + β·RMSNorm(W_out [R_sem ; E_lex(lex_t)])
      │             R_sem: top-k softmax read of this layer's semantic slots (LSH-addressed, gated writes)
      │
      └─ norm ─► lm_head (tied to the embedding) ─► logits [B, T, V] + copy_gain · onehot(lex_t)

The copy term lets the lexical lane vote on the next token directly: exact recall of a string seen
far outside the window works before any training, and training scales the vote (``copy_gain``).
``PRESETS["window_only"]`` (``rsm_every=0, lexical=False``) is the baseline the memory is measured against.

Streaming state (fixed size; float tensors fp32, the lexical lane's int64):
    b{i}.k / b{i}.v          [B, H, W, Dh]      sliding-window KV cache (layers.SlidingWindowAttention)
    r{i}.mk / .mv / .occ     [B, S, dk|dv|-]    semantic slots: keys, values, written mass
    r{i}.pend / .pslot       [B, U, dk+dv+1]    the current memory block's pending writes [K, V, g], slots
    lex.slots                [B, S_lex, 3]      lexical slots: key fingerprint, next token, score
    lex.counts / .rsum       [B, C] / [B]       the stream's rarity counts (C = V+1+2^17 for bigram, V for
                                                unigram rarity) and total rarity bits
    lex.hist / .rar          [B, n+w]           the last tokens and their rarity bits
    lex.exc                  [B, trail]         the excess bits of the last writes (the trail)
    lex.pend                 [B, U, 3]          the current memory block's pending lexical writes

Memory writes land at the end of each block of ``mem_block`` tokens (aligned to absolute positions,
so any chunking and stepping agree); ``mem_block`` <= ``window`` so the window covers the lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Backbone, register
from models.layers import RMSNorm, SlidingWindowAttention, SwiGLU, rms, swiglu
from models.rsm import LexicalLane, RecurrentSparseMemory, SemanticLane, check_lexical, check_semantic
from models.tokenizer import VOCAB_SIZE


@dataclass
class NexusConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 192
    n_layers: int = 6  # attention blocks; memory layers come on top
    n_heads: int = 4
    window: int = 256  # tokens each query sees, its own included (the KV cache length)
    rope_base: float = 10000.0
    rsm_every: int = 3  # a memory layer after every this many blocks (at least one; 0: none)
    mem_block: int = 128  # U: memory writes land every U tokens; <= window
    sem_slots: int = 4096  # per memory layer; a power of two (LSH sign bits)
    sem_topk: int = 8
    sem_key_dim: int = 32
    sem_value_dim: int = 64
    sem_gate_bias: float = -2.0  # initial gate logit offset: ~2% of tokens write at init
    sem_write_threshold: float = 0.5  # gates below this write nothing
    beta: float = 0.5  # initial fusion weight β
    lexical: bool = True  # the lexical lane and its copy vote
    lex_slots: int = 65536
    lex_ways: int = 32  # slots per LSH bucket
    lex_ngram: int = 12  # tokens hashed into a key
    lex_lookahead: int = 4  # tokens after a value that count toward its salience
    lex_margin_bits: int = 0  # salience needed to write: bits above the stream's average
    lex_rarity: str = "bigram"  # salience counts each token given the one before it ("unigram": alone)
    lex_horizon: int = 1 << 18  # tokens of recency worth one bit of salience when slots compete
    lex_trail: int = 12  # writes after a salient one that inherit its excess, less a bit per token
    copy_gain: float = 4.0  # initial weight of the lexical vote on the logits

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, d_model and n_layers must be >= 1")
        if self.n_heads < 1 or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size (RoPE)")
        if self.window < 1 or self.rsm_every < 0:
            raise ValueError(f"window must be >= 1 and rsm_every >= 0, got {self.window}, {self.rsm_every}")
        if (self.rsm_every or self.lexical) and not 1 <= self.mem_block <= self.window:
            raise ValueError(f"mem_block must be in 1..window ({self.window}) so the window covers the write lag, got {self.mem_block}")
        if self.rsm_every:
            check_semantic(self.sem_slots, self.sem_topk, self.sem_key_dim, self.sem_value_dim, self.mem_block, self.sem_write_threshold)
        if self.lexical:
            check_lexical(
                self.vocab_size, self.lex_slots, self.lex_ways, self.lex_ngram, self.lex_lookahead, self.lex_margin_bits,
                self.lex_horizon, self.mem_block, self.lex_rarity, self.lex_trail,
            )


# Named Config overrides: models.build("nexus", **PRESETS["window_only"]).
PRESETS: dict[str, dict[str, object]] = {
    "window_only": dict(rsm_every=0, lexical=False),  # the baseline the memory is measured against
    "seed": dict(window=1024, mem_block=1024, sem_slots=16384),  # the seed's sizes (001_*.txt); slower on a CPU
}


class Block(nn.Module):
    def __init__(self, cfg: NexusConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = SlidingWindowAttention(cfg.d_model, cfg.n_heads, cfg.window, rope=True, rope_base=cfg.rope_base)
        self.mlp = SwiGLU(cfg.d_model)


def _sub(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors named ``prefix.*``, without the prefix."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


@register
class Nexus(Backbone):
    """The Nexus Transformer. See the module docstring for the block tree and the state layout."""

    name = "nexus"
    Config = NexusConfig

    def __init__(self, config: NexusConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.lex = (
            LexicalLane(c.vocab_size, c.lex_slots, c.lex_ways, c.lex_ngram, c.lex_lookahead, c.lex_margin_bits, c.lex_horizon,
                        c.mem_block, c.lex_rarity, c.lex_trail)
            if c.lexical
            else None
        )
        self.copy_gain = nn.Parameter(torch.tensor(c.copy_gain)) if c.lexical else None
        # Layer plan: b{i} then r{i}; the names key the state too. A model shallower than rsm_every
        # still gets one memory layer, after its last block.
        self.blocks = nn.ModuleDict()
        every = min(c.rsm_every, c.n_layers)
        for i in range(c.n_layers):
            self.blocks[f"b{i}"] = Block(c)
            if every and (i + 1) % every == 0:
                sem = SemanticLane(
                    c.d_model, c.sem_slots, c.sem_topk, c.sem_key_dim, c.sem_value_dim, c.mem_block,
                    gate_bias=c.sem_gate_bias, write_threshold=c.sem_write_threshold, lsh_seed=i,
                )
                self.blocks[f"r{i}"] = RecurrentSparseMemory(c.d_model, c.vocab_size, sem, beta=c.beta)
        self.norm = RMSNorm(c.d_model)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        dev, B = self.device, batch_size
        out: dict[str, Tensor] = {}
        if self.lex is not None:
            out.update(_prefixed("lex", self.lex.init_state(B, dev)))
        for name, blk in self.blocks.items():
            if isinstance(blk, Block):
                out[f"{name}.k"], out[f"{name}.v"] = blk.attn.init_cache(B, dev)
            else:
                out.update(_prefixed(name, blk.init_state(B, dev)))
        return out

    def _lexical(self, tokens: Tensor, tensors: dict[str, Tensor], new: dict[str, Tensor], pos: int) -> Tensor:
        """The lexical lane's reads [B, T] (-1: none; all -1 without the lane); its state into ``new``."""
        if self.lex is None:
            return torch.full_like(tokens, -1)
        lex, st = self.lex(tokens, _sub(tensors, "lex"), pos)
        new.update(_prefixed("lex", st))
        return lex

    def _head(self, x: Tensor, lex: Tensor) -> Tensor:
        """Tied logits plus the lexical lane's vote for the token it recalls."""
        logits = F.linear(rms(self.norm, x), self.embed.weight)
        if self.copy_gain is None:
            return logits
        vote = (self.copy_gain * (lex >= 0)).to(logits.dtype)[..., None]
        return logits.scatter_add(-1, lex.clamp(min=0)[..., None], vote)

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        new: dict[str, Tensor] = {}
        lex = self._lexical(tokens, tensors, new, pos)
        x = self.embed(tokens)  # (B, T, D)
        for name, blk in self.blocks.items():
            if isinstance(blk, Block):
                y, new[f"{name}.k"], new[f"{name}.v"] = blk.attn(rms(blk.norm1, x), tensors[f"{name}.k"], tensors[f"{name}.v"], pos)
                x = x + y
                x = x + blk.mlp(rms(blk.norm2, x))
            else:
                x, st = blk(x, lex, _sub(tensors, name), pos)
                new.update(_prefixed(name, st))
        return self._head(x, lex), new

    def _step(self, token: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``_forward`` on one token, through the attention's direct decoding path."""
        new: dict[str, Tensor] = {}
        lex = self._lexical(token[:, None], tensors, new, pos)  # (B, 1)
        x = self.embed(token)  # (B, D)
        for name, blk in self.blocks.items():
            if isinstance(blk, Block):
                y, new[f"{name}.k"], new[f"{name}.v"] = blk.attn.step(rms(blk.norm1, x), tensors[f"{name}.k"], tensors[f"{name}.v"], pos)
                x = x + y
                x = x + swiglu(blk.mlp, rms(blk.norm2, x))
            else:
                x, st = blk(x[:, None], lex, _sub(tensors, name), pos)
                x = x[:, 0]
                new.update(_prefixed(name, st))
        return self._head(x, lex[:, 0]), new
