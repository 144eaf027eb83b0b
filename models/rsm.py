"""Recurrent Sparse Memory (RSM): a fixed number of memory slots beside a sliding window.

    tokens ──► LexicalLane          no weights; exact integer arithmetic
    │            key    = hash of the last n tokens (two 31-bit polynomial hashes: a 62-bit fingerprint)
    │            slot   = LSH of the key: bucket = key mod n_buckets, ``ways`` slots per bucket
    │            write  (key of the n tokens before x_t) → x_t, gated by salience: the rarity bits of
    │                   x_(t-n) .. x_(t+w) under the stream's own counts (``rarity``: each token given
    │                   the one before it, "bigram", or alone, "unigram") exceed the stream's
    │                   average by >= margin_bits; a salient write lends that excess, less a bit per
    │                   token, to the next ``trail`` writes. A stored key is rewritten in place; a new key takes
    │                   a slot of its bucket only if it outscores one (score = excess bits · horizon
    │                   + position: salient beats plain, recent beats old at horizon tokens per bit)
    │            read   the token that followed the current n-gram when it was last written, or -1
    │
    hidden ──► SemanticLane         learned projections
    │            K = normalize(W_K h), V = W_V h, g = σ(W_g h), slot S = LSH(K) (sign bits of fixed hyperplanes)
    │            write  where g >= write_threshold (sparse):  M[S] = (1-g)·M[S] + g·[K, V, 1]
    │            read   R = softmax(τ · top-k_S(Q·M_K[S])) · M_V   over the slots ever written
    │
    RecurrentSparseMemory (one per memory layer): H + β·RMSNorm(W_out [R_sem ; E_lex(lexical read)])

Micro-chunks. Time is cut into blocks of ``block`` tokens aligned to absolute positions. Reads in a
block see the memory as it was at the block's start; the block's writes wait in a pending buffer
(part of the state) and land together when its last token arrives, as one vectorised
gather/scatter update. Because blocks are aligned to absolute positions, not to the chunks a caller
happens to use, ``forward`` over any chunking and token-by-token stepping make the same reads and
writes: the lexical lane bit for bit, the semantic lane up to float rounding. A fact is readable from
memory at most ``block`` tokens after it was seen, so ``block`` <= the attention window loses nothing.

Capacity arithmetic (why the lexical gate and scores exist): a stream of N tokens written densely
into S slots overwrites each slot ~N/S times, so a needle would not survive 512k tokens in 64k
slots under plain overwrite or LRU. Only improbable stretches (numbers, identifiers, rare names)
are written; repeated text rewrites the slots it already owns instead of taking new ones; and a
bucket keeps its best-scored entries, so a needle is lost only when ``ways`` newer entries at least
as salient land in its bucket. The repository's Markdown, cycled, owns ~29k salient n-grams, and
each needle ~50 more: 16k slots overflowed and lost the oldest needles once same-format
distractors came every 2k tokens, and 64k (1.5 MiB of int64) hold prose and 612 needles in 1M
tokens. Bigram rarity lifts UUIDs in prose from about half (under unigram counts a hex id in text
full of hashes and figures is not rare); the trail keeps a 7-digit value's last digits, which are
no rarer than the prose's own numbers once the key has left the n-gram (93% of such values -> 100%
at 512k). Figures: bench/README.md.

States are plain dicts of tensors (lexical: int64, semantic: fp32) so a backbone can embed them in
its ``State`` under a prefix; no function here mutates the tensors it is given.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import RMSNorm, rms

# Two primes below 2^31: products of a window token (< 2^20) and a multiplier stay
# below 2^51, so a window sum never overflows int64, and fingerprint = h1 * P2 + h2 < 2^62.
_P1, _P2 = 2_147_483_647, 2_147_483_629
_A1, _A2 = 1_000_003, 999_983
_MAX_VOCAB = 1 << 20
# Prior of the stream's average rarity: 4 bits per token (about the unigram entropy of English
# bytes), worth 1024 tokens of evidence.
_PRIOR_BITS, _PRIOR_TOKENS = 4, 1024
# Token pairs counted for bigram rarity, by (previous + 1) * vocab + token modulo this size: exact
# for the byte vocabulary (273 * 272 < 2^17), a fixed-size hashed count table for a larger one.
_PAIR_TABLE = 1 << 17
RARITY_MODELS = ("bigram", "unigram")
# Score of an empty slot or of no write: below any real score (which is >= 0).
_EMPTY = -(1 << 62)
# Excess of no write (before the stream's start): no fade brings it near a real write's.
_NO_EXCESS = -(1 << 40)
# Bits a lent excess loses per token it travels along the trail.
_TRAIL_FADE_BITS = 1
# Read score of a slot never written (see SemanticLane._read).
_UNWRITTEN = -1e9
# g is clamped below 1 so log(1 - g) (the block update's decay) stays finite.
_MAX_GATE = 0.999


def blocks(pos: int, length: int, block: int) -> Iterator[tuple[int, int, int, bool]]:
    """Cut ``length`` tokens starting at absolute ``pos`` at block boundaries: yields
    (offset in the chunk, segment length, fill of the block before the segment, block completed)."""
    s = 0
    while s < length:
        fill = (pos + s) % block
        n = min(block - fill, length - s)
        yield s, n, fill, fill + n == block
        s += n


def check_lexical(
    vocab_size: int, slots: int, ways: int, ngram: int, lookahead: int, margin_bits: int, horizon: int, block: int,
    rarity: str, trail: int,
) -> None:
    """Raise ValueError naming the first impossible LexicalLane setting."""
    if rarity not in RARITY_MODELS:
        raise ValueError(f"lexical lane: rarity must be one of {', '.join(RARITY_MODELS)}, got {rarity!r}")
    if not 1 <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"lexical lane: vocab_size must be in 1..{_MAX_VOCAB}, got {vocab_size}")
    if ways < 1 or slots < ways or slots % ways:
        raise ValueError(f"lexical lane: slots ({slots}) must be a positive multiple of ways ({ways})")
    if not 1 <= ngram <= 64 or min(lookahead, margin_bits, horizon, trail) < 0 or block < 1:
        raise ValueError(
            f"lexical lane: need 1 <= ngram <= 64 and lookahead, margin_bits, horizon, trail >= 0, block >= 1 "
            f"(got ngram={ngram}, lookahead={lookahead}, margin_bits={margin_bits}, horizon={horizon}, "
            f"trail={trail}, block={block})"
        )


def check_semantic(slots: int, topk: int, key_dim: int, value_dim: int, block: int, write_threshold: float) -> None:
    """Raise ValueError naming the first impossible SemanticLane setting."""
    if slots < 2 or slots & (slots - 1) or slots > 1 << 24:
        raise ValueError(f"semantic lane: slots must be a power of two in 2..2^24 (LSH sign bits), got {slots}")
    if not 1 <= topk <= slots or key_dim < 1 or value_dim < 1 or block < 1:
        raise ValueError(
            f"semantic lane: need 1 <= topk <= slots and key_dim, value_dim, block >= 1 "
            f"(got topk={topk}, key_dim={key_dim}, value_dim={value_dim}, block={block})"
        )
    if not 0.0 <= write_threshold < 1.0:
        raise ValueError(f"semantic lane: write_threshold must be in [0, 1), got {write_threshold}")


def _log2_floor(n: Tensor) -> Tensor:
    """floor(log2(n)) of positive int64 n < 2^53, exactly (frexp reads the float's exponent)."""
    return torch.frexp(n.double())[1].long() - 1


def _no_writes(batch_size: int, block: int, device: torch.device | None) -> Tensor:
    """An empty lexical pending buffer [B, U, 3]: key 0, value 0, score _EMPTY (no write)."""
    buf = torch.zeros(batch_size, block, 3, dtype=torch.long, device=device)
    buf[..., 2] = _EMPTY
    return buf


def _put(buf: Tensor, fill: int, new: Tensor) -> Tensor:
    """``buf`` with positions fill .. fill+len(new) along dim 1 replaced (a new tensor)."""
    return torch.cat([buf[:, :fill], new, buf[:, fill + new.shape[1] :]], dim=1)


class LexicalLane(nn.Module):
    """Exact n-gram → next-token memory over token ids (see the module docstring). No parameters."""

    def __init__(
        self, vocab_size: int, slots: int = 65536, ways: int = 32, ngram: int = 12, lookahead: int = 4,
        margin_bits: int = 0, horizon: int = 1 << 18, block: int = 128, rarity: str = "bigram", trail: int = 12,
    ) -> None:
        super().__init__()
        check_lexical(vocab_size, slots, ways, ngram, lookahead, margin_bits, horizon, block, rarity, trail)
        self.vocab_size, self.slots, self.ways, self.n_buckets = vocab_size, slots, ways, slots // ways
        self.ngram, self.lookahead, self.block = ngram, lookahead, block
        self.margin_bits, self.horizon, self.rarity, self.trail = margin_bits, horizon, rarity, trail
        self.hist = ngram + lookahead  # tokens of history a write at t needs: x_(t-n-w) .. x_(t-1)
        # Powers of the hash multipliers, newest token first; constants, so not in checkpoints.
        a1 = [pow(_A1, j, _P1) for j in range(ngram)][::-1]
        a2 = [pow(_A2, j, _P2) for j in range(ngram)][::-1]
        self.register_buffer("_pow1", torch.tensor(a1, dtype=torch.long), persistent=False)
        self.register_buffer("_pow2", torch.tensor(a2, dtype=torch.long), persistent=False)
        # What a write `i` tokens back lends the current one: its excess less i bits, oldest first.
        self.register_buffer("_fade", torch.arange(trail, -1, -1) * _TRAIL_FADE_BITS, persistent=False)

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """Empty memory: every tensor int64, sizes fixed by the config."""
        B, S, U, H = batch_size, self.slots, self.block, self.hist

        def z(*shape: int, fill: int = 0) -> Tensor:
            return torch.full(shape, fill, dtype=torch.long, device=device)

        slots = z(B, S, 3)  # per slot: [key fingerprint (0: empty), the token that followed it, score]
        slots[..., 2] = _EMPTY  # retention score: excess bits * horizon + write position
        return {
            "slots": slots,
            # The whole stream's counts (the rarity model): per token; or, for bigrams, per previous
            # token (the stream's start counts as one more) and then per (previous, token) pair.
            "counts": z(B, self.vocab_size if self.rarity == "unigram" else self.vocab_size + 1 + _PAIR_TABLE),
            "rsum": z(B),  # Σ rarity bits of the whole stream: the baseline a salient stretch must beat
            "hist": z(B, H, fill=-1),  # the last n+w tokens; -1 before the stream's start
            "rar": z(B, H),  # their rarity bits
            "exc": z(B, self.trail, fill=_NO_EXCESS),  # the excess bits of the last `trail` writes
            "pend": _no_writes(B, U, device),  # the current block's writes: [key, value, score]
        }

    # -- pieces ---------------------------------------------------------------------------------
    def _hashes(self, tokens: Tensor) -> Tensor:
        """Fingerprints [B, L-n+1] of every n-token window of tokens [B, L] (ids, -1 = none)."""
        win = (tokens + 1).unfold(1, self.ngram, 1)  # (B, L-n+1, n); +1 so that -1 (no token) adds 0
        h1 = (win * self._pow1).sum(-1) % _P1
        h2 = (win * self._pow2).sum(-1) % _P2
        return h1 * _P2 + h2 + 1  # >= 1: 0 marks an empty slot

    def _bucket(self, fp: Tensor) -> Tensor:
        return ((fp - 1) // _P2) % self.n_buckets

    def _rarity(self, seg: Tensor, counts: Tensor, pos: int, prev: Tensor) -> tuple[Tensor, Tensor]:
        """Rarity bits of each token of ``seg`` [B, L] under the counts of everything before it, and
        the new counts; ``prev`` [B] is the token before the segment (-1 at the stream's start).
        unigram: bits = floor(log2(N + V)) - floor(log2(c(x) + 1)), -log2 of the add-one estimate of
        p(x), ±1. bigram: floor(log2(c(p) + V)) - floor(log2(c(p, x) + 1)), the same for p(x | p), so
        a token is rare where it is unexpected after the one before it: a random key or a hex id in
        prose is, a digit in the middle of a table's numbers is not."""
        B, L = seg.shape
        earlier = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril(-1)

        def seen(ids: Tensor, table: Tensor) -> Tensor:  # count before the segment plus earlier in it
            return table.gather(1, ids) + ((ids[:, :, None] == ids[:, None, :]) & earlier).sum(-1)

        if self.rarity == "unigram":
            total = [(pos + i + self.vocab_size).bit_length() - 1 for i in range(L)]  # floor(log2(N + V))
            bits = torch.tensor(total, device=seg.device)[None, :] - _log2_floor(seen(seg, counts) + 1)
            return bits, counts.scatter_add(1, seg, torch.ones_like(seg))
        V = self.vocab_size
        ctx = torch.cat([prev[:, None], seg[:, :-1]], 1) + 1  # 0: the stream's start
        pair = V + 1 + (ctx * V + seg) % _PAIR_TABLE
        bits = _log2_floor(seen(ctx, counts) + V) - _log2_floor(seen(pair, counts) + 1)
        one = torch.ones_like(seg)
        return bits, counts.scatter_add(1, ctx, one).scatter_add(1, pair, one)

    def _ways(self, slots: Tensor, bucket: Tensor) -> Tensor:
        """The slots [B, L, ways, 3] of each bucket [B, L]."""
        B, L = bucket.shape
        rows = slots.view(B, self.n_buckets, self.ways * 3)
        return rows.gather(1, bucket[..., None].expand(B, L, self.ways * 3)).view(B, L, self.ways, 3)

    def lookup(self, state: dict[str, Tensor], fp: Tensor) -> Tensor:
        """The value stored under each fingerprint fp [B, L], or -1: [B, L]."""
        ways = self._ways(state["slots"], self._bucket(fp))
        hit = ways[..., 0] == fp[..., None]  # fingerprints in a bucket are distinct: at most one hit
        return torch.where(hit.any(-1), (ways[..., 1] * hit).sum(-1), -1)

    def _land(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Land the current block's pending writes (all integer ops: every path lands them alike)."""
        pend, slots = state["pend"], state["slots"]
        fp, score = pend[..., 0], pend[..., 2]
        B, U = fp.shape
        dev, W = fp.device, self.ways
        later = torch.ones(U, U, dtype=torch.bool, device=dev).triu(1)  # [i, j]: j after i
        live = score > _EMPTY
        # A later write of the same key supersedes an earlier one in the block.
        keep = live & ~((fp[:, :, None] == fp[:, None, :]) & later & live[:, None, :]).any(-1)
        bucket = self._bucket(fp)
        hitw = self._ways(slots, bucket)[..., 0] == fp[..., None]  # (B, U, W)
        hit, new = keep & hitw.any(-1), keep & ~hitw.any(-1)
        rows = torch.arange(B, device=dev)[:, None].expand(B, U)

        def put(mask: Tensor, slot: Tensor) -> Tensor:
            return slots.index_put((rows[mask], slot[mask]), pend[mask])

        # A key already stored is rewritten in place (the latest value wins, with its new score).
        slots = put(hit, bucket * W + hitw.long().argmax(-1))
        # New keys compete with their bucket's slots on score: the bucket keeps its W best entries,
        # old or new, and ties go to what is already stored. Winners take the lowest-scored slots.
        ways_score = self._ways(slots, bucket)[..., 2]  # (B, U, W)
        same = (bucket[:, :, None] == bucket[:, None, :]) & new[:, None, :]  # (B, U, U): j new, same bucket
        better = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & later)
        wins = new & ((same & better).sum(-1) + (ways_score >= score[..., None]).sum(-1) < W)
        k = (same & better & wins[:, None, :]).sum(-1)  # winners in the bucket ranked above this one
        way = ways_score.argsort(dim=-1, stable=True).gather(-1, k.clamp(max=W - 1)[..., None])[..., 0]
        return {**state, "slots": put(wins, bucket * W + way), "pend": _no_writes(B, U, dev)}

    # -- the lane -------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, state: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """tokens [B, T] at absolute ``pos`` -> (predicted next token [B, T], -1 where none; state)."""
        if tokens.dim() != 2:
            raise ValueError(f"lexical lane: tokens must be [B, T], got shape {tuple(tokens.shape)}")
        n, w, H = self.ngram, self.lookahead, self.hist
        preds = []
        for s, L, fill, done in blocks(pos, tokens.shape[1], self.block):
            seg = tokens[:, s : s + L]
            r, counts = self._rarity(seg, state["counts"], pos + s, state["hist"][:, -1])
            ext, ext_r = torch.cat([state["hist"], seg], 1), torch.cat([state["rar"], r], 1)  # (B, H+L)
            fps = self._hashes(ext)  # (B, w+L+1): window k ends at ext index k+n-1
            preds.append(self.lookup(state, fps[:, w + 1 :]))  # the n-gram ending at each token
            # The write decided at t: key = the n-gram ending at t-w-1, value = x_(t-w). Its
            # salience is how far the bits of x_(t-w-n) .. x_t (key, value and w tokens after it)
            # exceed the stream's average bits per token times n+w+1; integers, so exact.
            value = ext[:, n : n + L]
            rsum = state["rsum"][:, None] + r.cumsum(1)  # (B, L): Σ bits through each token
            seen = pos + s + 1 + torch.arange(L, device=tokens.device)  # tokens through each
            # The average starts from a prior (see _PRIOR_BITS) so the stream's first tokens, all
            # "rare" against empty counts, are judged against ordinary text, not against each other.
            n_avg = seen + _PRIOR_TOKENS
            excess = torch.div(
                ext_r.unfold(1, H + 1, 1).sum(-1) * n_avg - (H + 1) * (rsum + _PRIOR_BITS * _PRIOR_TOKENS), n_avg, rounding_mode="floor"
            )
            # The trail: a salient write lends its excess, fading, to the writes after it, so a
            # value's plain tail (the last digits of a number, read after digits) is kept with its
            # rare head; a chain of reads is only as long as its weakest link.
            ext_e = torch.cat([state["exc"], torch.where(value >= 0, excess, _NO_EXCESS)], 1)  # (B, trail+L)
            excess = (ext_e.unfold(1, self.trail + 1, 1) - self._fade).amax(-1)
            gate = (excess >= self.margin_bits) & (value >= 0)
            score = torch.where(gate, excess * self.horizon + (seen - 1 - w), _EMPTY)
            state = {
                **state,
                "exc": ext_e[:, ext_e.shape[1] - self.trail :],
                "counts": counts,
                "rsum": rsum[:, -1],
                "hist": ext[:, -H:],
                "rar": ext_r[:, -H:],
                "pend": _put(state["pend"], fill, torch.stack([fps[:, :L], value, score], dim=-1)),
            }
            if done:
                state = self._land(state)
        return torch.cat(preds, dim=1), state

    @torch.no_grad()
    def complete(self, prompt: Tensor, state: dict[str, Tensor], pos: int, max_new: int) -> Tensor:
        """Greedy continuation [B, max_new] of ``prompt`` [B, P] from the lane alone: feed the prompt,
        then each recalled token; -1 once nothing is recalled. ``state`` is left as it was."""
        pred, state = self.forward(prompt, state, pos)
        pos += prompt.shape[1]
        out = [pred[:, -1]]
        for _ in range(max_new - 1):
            nxt = out[-1]
            p, state = self.forward(nxt.clamp(min=0)[:, None], state, pos)
            pos += 1
            out.append(torch.where(nxt >= 0, p[:, 0], -1))
        return torch.stack(out, dim=1)


class SemanticLane(nn.Module):
    """Learned keys, values and gates; LSH-addressed slots; top-k softmax reads. See the module docstring."""

    def __init__(
        self, d_model: int, slots: int = 4096, topk: int = 8, key_dim: int = 32, value_dim: int = 64, block: int = 128,
        gate_bias: float = -2.0, write_threshold: float = 0.5, lsh_seed: int = 0,
    ) -> None:
        super().__init__()
        check_semantic(slots, topk, key_dim, value_dim, block, write_threshold)
        self.slots, self.topk, self.key_dim, self.value_dim, self.block = slots, topk, key_dim, value_dim, block
        self.write_threshold = write_threshold
        self.proj = nn.Linear(d_model, 2 * key_dim + value_dim + 1)  # K, Q, V, gate logit
        with torch.no_grad():
            self.proj.bias.zero_()
            self.proj.bias[-1] = gate_bias  # sparse writes from the start: σ(z - 2) >= 0.5 for ~2% of tokens
        self.log_temp = nn.Parameter(torch.tensor(2.3))  # τ = e^2.3 ≈ 10: sharp reads over unit keys
        bits = slots.bit_length() - 1
        g = torch.Generator().manual_seed(lsh_seed)
        # Fixed hyperplanes, saved with the weights: a state's slots mean nothing without them.
        self.register_buffer("planes", torch.randn(key_dim, bits, generator=g))
        self.register_buffer("_bit", 2 ** torch.arange(bits), persistent=False)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        B, S, U, dk, dv = batch_size, self.slots, self.block, self.key_dim, self.value_dim
        return {
            "mk": torch.zeros(B, S, dk, device=device),  # slot keys
            "mv": torch.zeros(B, S, dv, device=device),  # slot values
            "occ": torch.zeros(B, S, device=device),  # 1 - Π(1 - g): how much was ever written; 0 = empty
            "pend": torch.zeros(B, U, dk + dv + 1, device=device),  # the current block's writes: [K, V, g]
            "pslot": torch.zeros(B, U, dtype=torch.long, device=device),  # and their slots
        }

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, T, D] -> queries [B, T, dk] (unit), writes [B, T, dk+dv+1] (unit key, value,
        effective gate: σ(W_g h), 0 below the threshold, so writes are sparse) and LSH slots [B, T]."""
        dk = self.key_dim
        k, q, v, z = self.proj(h).float().split([dk, dk, self.value_dim, 1], dim=-1)
        k = F.normalize(k, dim=-1)
        g = torch.sigmoid(z).clamp(max=_MAX_GATE)
        slot = (((k @ self.planes) > 0) * self._bit).sum(-1)  # sign bits of the key's projections
        return F.normalize(q, dim=-1), torch.cat([k, v, g * (g >= self.write_threshold)], dim=-1), slot

    def _read(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """q [B, L, dk] (unit) -> softmax over the top-k written slots' keys, of their values [B, L, dv]."""
        B, L, _ = q.shape
        k, dv = self.topk, self.value_dim
        # Slots never written score _UNWRITTEN: below any real score (|τ q·k| <= τ), so they get no
        # weight while a written slot is in the top k. Finite, unlike -inf, so an empty memory reads
        # as the mean of its zero values, 0, with finite gradients.
        empty = ((state["occ"] == 0) * _UNWRITTEN)[:, None, :]  # (B, 1, S)
        scores = torch.baddbmm(empty, q * self.log_temp.exp(), state["mk"].transpose(1, 2))  # (B, L, S)
        top, idx = scores.topk(k, dim=-1)  # (B, L, k)
        vals = state["mv"].gather(1, idx.reshape(B, L * k, 1).expand(-1, -1, dv))  # (B, L*k, dv)
        return torch.bmm(top.softmax(-1).view(B * L, 1, k), vals.view(B * L, k, dv)).view(B, L, dv)

    def _land(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Land the block's pending writes in order: M[S] = (1-g)·M[S] + g·x for each write to S, as
        one scatter over the touched slots: M[S]·Π(1-g_j) + Σ_i g_i·Π_(j>i, same S)(1-g_j)·x_i."""
        pend, slot = state["pend"], state["pslot"]
        B, U, C = pend.shape
        S, dk = self.slots, self.key_dim
        g = pend[..., -1]
        lg = torch.log1p(-g)  # (B, U); 0 where nothing is written
        later = torch.ones(U, U, dtype=torch.bool, device=g.device).triu(1)
        same_later = (slot[:, :, None] == slot[:, None, :]) & later
        coef = (g * torch.exp(torch.bmm(same_later.to(g.dtype), lg[..., None])[..., 0])).reshape(-1)  # (B*U,)
        flat = (slot + S * torch.arange(B, device=g.device)[:, None]).reshape(-1)  # rows of the (B*S) tables
        touched = torch.unique(flat)  # sorted: deterministic, and no duplicate writes for autograd
        decay = torch.zeros(B * S, device=g.device).index_add(0, flat, lg.reshape(-1))[touched].exp()

        def upd(m: Tensor, x: Tensor) -> Tensor:
            out = m.reshape(B * S, -1).clone()  # the untouched slots are copied as they are
            out[touched] = out[touched] * decay[:, None]
            return out.index_add_(0, flat, coef[:, None] * x.reshape(B * U, -1)).view(m.shape)

        x = pend[..., :-1]
        return {
            **state,
            "mk": upd(state["mk"], x[..., :dk]),
            "mv": upd(state["mv"], x[..., dk:]),
            "occ": upd(state["occ"][..., None], torch.ones_like(g)[..., None])[..., 0],
            "pend": torch.zeros_like(pend),
            "pslot": torch.zeros_like(slot),
        }

    def forward(self, h: Tensor, state: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """h [B, T, D] at absolute ``pos`` -> (reads [B, T, dv], state)."""
        q, writes, slot = self.project(h)
        reads = []
        for s, L, fill, done in blocks(pos, h.shape[1], self.block):
            reads.append(self._read(q[:, s : s + L], state))
            state = {
                **state,
                "pend": _put(state["pend"], fill, writes[:, s : s + L]),
                "pslot": _put(state["pslot"], fill, slot[:, s : s + L]),
            }
            if done:
                state = self._land(state)
        return torch.cat(reads, dim=1).to(h.dtype), state


class RecurrentSparseMemory(nn.Module):
    """One memory layer: the semantic lane's read and the lexical lane's recalled token, fused into
    the stream as H + β·RMSNorm(W_out [R_sem ; E_lex(token)]). The lexical lane is token-only, so a
    backbone runs one and hands its reads to every memory layer."""

    def __init__(self, d_model: int, vocab_size: int, semantic: SemanticLane, beta: float = 0.5) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.sem = semantic
        self.lex_embed = nn.Embedding(vocab_size + 1, d_model, padding_idx=0)  # row 0: nothing recalled
        nn.init.normal_(self.lex_embed.weight[1:], std=0.02)
        self.out = nn.Linear(semantic.value_dim + d_model, d_model, bias=False)
        self.out_norm = RMSNorm(d_model)
        self.beta = nn.Parameter(torch.tensor(beta))

    def init_state(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        return self.sem.init_state(batch_size, device)

    def forward(self, x: Tensor, lex: Tensor, state: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, D], lexical reads lex [B, T] (-1: none) -> (fused x, state)."""
        r, state = self.sem(rms(self.norm, x), state, pos)
        fused = F.linear(torch.cat([r, F.embedding(lex + 1, self.lex_embed.weight, padding_idx=0)], dim=-1), self.out.weight)
        return x + self.beta * rms(self.out_norm, fused), state
