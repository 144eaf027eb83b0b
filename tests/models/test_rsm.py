"""The Recurrent Sparse Memory on its own (models.rsm): lexical recall far beyond any window, exact
streaming, the write gate and the slot competition; the semantic lane's gated update and top-k read
against straightforward references."""

from __future__ import annotations

import random

import pytest
import torch

from models import rsm
from models.rsm import LexicalLane, RecurrentSparseMemory, SemanticLane, blocks

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _ids(text: str | bytes) -> torch.Tensor:
    data = text.encode() if isinstance(text, str) else text
    return torch.tensor(list(data))[None]


def _stream(lane: LexicalLane, tokens: torch.Tensor, chunk: int = 1000) -> dict[str, torch.Tensor]:
    state = lane.init_state(tokens.shape[0])
    for s in range(0, tokens.shape[1], chunk):
        _, state = lane(tokens[:, s : s + chunk], state, s)
    return state


def _recall(lane: LexicalLane, state: dict[str, torch.Tensor], pos: int, prompt: str, n: int) -> str:
    out = lane.complete(_ids(prompt), state, pos, n)[0].tolist()
    return "".join(chr(t) if t >= 0 else "∅" for t in out)


def test_blocks_cut_at_absolute_boundaries() -> None:
    assert list(blocks(5, 20, 8)) == [(0, 3, 5, True), (3, 8, 0, True), (11, 8, 0, True), (19, 1, 0, False)]
    assert list(blocks(16, 3, 8)) == [(0, 3, 0, False)]
    assert list(blocks(7, 1, 8)) == [(0, 1, 7, True)]


# -- lexical lane -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rarity", rsm.RARITY_MODELS)
def test_lexical_needles_recalled_after_a_long_stream(rarity: str) -> None:
    # 20 needles in ~60k tokens, blocks of 32: every needle is written thousands of tokens and
    # hundreds of blocks before it is asked for. Each needle writes ~35 salient n-grams (its key,
    # value and their neighbourhood), so 20 of them need ~700 of the 1024 slots.
    lane = LexicalLane(272, slots=1024, ways=16, ngram=10, lookahead=4, block=32, rarity=rarity)
    rnd = random.Random(1)
    needles = {f"{rnd.getrandbits(32):08x}": str(rnd.randrange(10**6, 10**7)) for _ in range(20)}
    parts = []
    for key, value in needles.items():
        parts += [FILLER * 30, f"The magic number for {key} is: {value}. ".encode()]
    stream = _ids(b"".join(parts) + FILLER * 30)
    state = _stream(lane, stream)
    got = {k: _recall(lane, state, stream.shape[1], f"The magic number for {k} is: ", 7) for k in needles}
    assert got == needles
    # A key never seen recalls nothing.
    assert _recall(lane, state, stream.shape[1], "The magic number for 0badc0de is: ", 3) == "∅∅∅"


def test_lexical_chunked_and_stepped_are_bit_identical() -> None:
    lane = LexicalLane(272, slots=64, ways=4, ngram=4, lookahead=2, block=8)
    rnd = random.Random(2)
    text = b"".join(FILLER[: rnd.randrange(5, 40)] + str(rnd.randrange(10**5)).encode() for _ in range(20))
    tokens = _ids(text).repeat(2, 1)
    tokens[1] = tokens[1].roll(7)  # two different streams in one batch
    whole, s_whole = lane(tokens, lane.init_state(2), 0)
    preds, state, s = [], lane.init_state(2), 0
    for n in [1, 3, 7, 8, 16, 5] * 40:
        if s >= tokens.shape[1]:
            break
        p, state = lane(tokens[:, s : s + n], state, s)
        preds.append(p)
        s += n
    assert torch.equal(torch.cat(preds, 1), whole)
    assert all(torch.equal(state[k], v) for k, v in s_whole.items())
    assert (whole >= 0).any() and (s_whole["slots"][..., 0] > 0).sum() > 10  # it did write and read


def test_lexical_state_is_fixed_size_integers_and_never_mutated() -> None:
    lane = LexicalLane(272, slots=128, ways=8, ngram=5, block=16)
    state = lane.init_state(1)
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    frozen = {k: v.clone() for k, v in state.items()}
    _, after = lane(torch.randint(0, 272, (1, 3000)), state, 0)
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == shapes
    assert all(v.dtype == torch.long for v in after.values())


def test_repeated_text_takes_no_new_slots_and_rare_text_is_written() -> None:
    lane = LexicalLane(272, slots=1024, ways=8, ngram=8, block=16)
    state = _stream(lane, _ids(FILLER * 50))
    used = int((state["slots"][..., 0] > 0).sum())
    state2 = lane(_ids(FILLER * 50), state, len(FILLER) * 50)[1]
    assert int((state2["slots"][..., 0] > 0).sum()) == used  # the same n-grams again: nothing new is written
    rare = _ids(b"Code QX-7781-ZZ9 is 4417. " + FILLER)
    state3 = lane(rare, state2, len(FILLER) * 100)[1]
    assert int((state3["slots"][..., 0] > 0).sum()) > used  # the improbable stretch is


def test_writes_lag_at_most_one_block() -> None:
    lane = LexicalLane(272, slots=256, ways=8, ngram=4, lookahead=0, block=16)
    text = b"zq#7 then zq#7.."  # the second "zq#7" is 10 tokens after the first: same block
    pred, state = lane(_ids(text), lane.init_state(1), 0)
    assert (pred == -1).all()  # the first occurrence is still pending
    pred, _ = lane(_ids(b"xx zq#"), state, len(text))  # in the next block it has landed
    assert pred[0, -1].item() == ord("7")


def _fp_in_bucket(lane: LexicalLane, bucket: int, i: int) -> int:
    """A fingerprint that falls in ``bucket`` (the bucket comes from the first hash)."""
    h1 = bucket + lane.n_buckets * (i + 1)
    return h1 * rsm._P2 + i + 1


def test_bucket_keeps_its_best_scored_entries() -> None:
    lane = LexicalLane(272, slots=8, ways=4, ngram=2, block=4)  # 2 buckets of 4 ways
    state = lane.init_state(1)

    def land(entries: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
        pend = rsm._no_writes(1, 4, None)
        for j, e in enumerate(entries):
            pend[0, j] = torch.tensor(e)
        return lane._land({**state, "pend": pend})

    fps = [_fp_in_bucket(lane, 1, i) for i in range(8)]
    state = land([(fps[i], 100 + i, 10 * (i + 1)) for i in range(4)])  # bucket 1 full, scores 10..40
    assert sorted(state["slots"][0, 4:, 1].tolist()) == [100, 101, 102, 103]
    # A new key scored below everything stored is dropped; one scored 25 evicts the score-10 entry.
    state = land([(fps[4], 200, 5), (fps[5], 201, 25)])
    assert sorted(state["slots"][0, 4:, 1].tolist()) == [101, 102, 103, 201]
    # A stored key is rewritten in place, whatever its new score.
    state = land([(fps[3], 300, 1)])
    assert sorted(state["slots"][0, 4:, 1].tolist()) == [101, 102, 201, 300]
    assert int((state["slots"][0, :4, 0] > 0).sum()) == 0  # the other bucket is untouched
    # More new keys than ways in one block: the best four of old and new survive.
    state = land([(fps[6], 400, 99), (fps[7], 401, 98), (fps[4], 402, 97), (fps[0], 403, 96)])
    assert sorted(state["slots"][0, 4:, 1].tolist()) == [400, 401, 402, 403]


def test_bigram_rarity_weighs_a_token_by_the_one_before_it() -> None:
    # After "abab...", "b" following "a" is expected and "b" following "b" never seen; under unigram
    # counts both are the same common "b".
    history = _ids("ab" * 200)
    probe = _ids("abb")
    bits = {}
    for rarity in rsm.RARITY_MODELS:
        lane = LexicalLane(272, slots=64, ways=4, ngram=4, block=8, rarity=rarity)
        state = _stream(lane, history)
        r, _ = lane._rarity(probe, state["counts"], history.shape[1], state["hist"][:, -1])
        bits[rarity] = r[0].tolist()
    assert bits["unigram"][1] == bits["unigram"][2]
    assert bits["bigram"][2] >= bits["bigram"][1] + 7  # p(b | a) ~ 1, p(b | b) ~ 1/(200 + V)


def test_trail_keeps_a_plain_tail_with_its_rare_head() -> None:
    # In a table of numbers, digits after digits are expected: once the 8-token key has moved past
    # the rare "ZQ#X", a value's last digits are no rarer than the stream's average. Without the
    # trail they are not written and recall stops short; with it they inherit the head's salience.
    rnd = random.Random(3)
    table = "".join(f"id {i} is {rnd.randrange(10**6, 10**7)}.\n" for i in range(400))
    tokens = _ids(table + "The code of ZQ#X is 8300011.\n" + table)
    got = {}
    for trail in (0, 12):
        lane = LexicalLane(272, slots=8192, ways=16, ngram=8, block=32, trail=trail)
        got[trail] = _recall(lane, _stream(lane, tokens), tokens.shape[1], "The code of ZQ#X is ", 7)
    assert got == {0: "83000∅∅", 12: "8300011"}


def test_lexical_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="multiple of ways"):
        LexicalLane(272, slots=100, ways=8)
    with pytest.raises(ValueError, match="ngram"):
        LexicalLane(272, ngram=0)
    with pytest.raises(ValueError, match="trail=-1"):
        LexicalLane(272, trail=-1)
    with pytest.raises(ValueError, match="rarity must be one of bigram, unigram, got 'trigram'"):
        LexicalLane(272, rarity="trigram")
    with pytest.raises(ValueError, match="tokens must be"):
        LexicalLane(272)(torch.zeros(5, dtype=torch.long), LexicalLane(272).init_state(1), 0)


# -- semantic lane ----------------------------------------------------------------------------------
def _lane(**kw: object) -> SemanticLane:
    torch.manual_seed(0)
    return SemanticLane(16, **{"slots": 16, "topk": 4, "key_dim": 8, "value_dim": 6, "block": 8, "gate_bias": 0.0, **kw})  # type: ignore[arg-type]


def test_block_update_equals_the_sequential_gated_rule() -> None:
    lane = _lane()
    state = lane.init_state(2)
    state["mk"], state["mv"], state["occ"] = torch.randn(2, 16, 8), torch.randn(2, 16, 6), torch.rand(2, 16)
    pend, slot = torch.randn(2, 8, 15), torch.randint(0, 4, (2, 8))  # few slots: repeated writes
    pend[..., -1] = torch.rand(2, 8) * (torch.rand(2, 8) > 0.3)  # some entries write nothing
    out = lane._land({**state, "pend": pend, "pslot": slot})
    mk, mv, occ = state["mk"].clone(), state["mv"].clone(), state["occ"].clone()
    for b in range(2):
        for i in range(8):  # M[S] = (1-g)·M[S] + g·x, one write after another
            s, g = slot[b, i], pend[b, i, -1]
            mk[b, s] = (1 - g) * mk[b, s] + g * pend[b, i, :8]
            mv[b, s] = (1 - g) * mv[b, s] + g * pend[b, i, 8:14]
            occ[b, s] = (1 - g) * occ[b, s] + g
    torch.testing.assert_close(out["mk"], mk)
    torch.testing.assert_close(out["mv"], mv)
    torch.testing.assert_close(out["occ"], occ)
    assert not out["pend"].any() and not out["pslot"].any()


def test_read_is_a_softmax_over_the_top_k_written_slots() -> None:
    lane = _lane()
    state = lane.init_state(1)
    q = torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1)
    assert torch.equal(lane._read(q, state), torch.zeros(1, 3, 6))  # empty memory: zero, not NaN
    state["mk"], state["mv"] = torch.randn(1, 16, 8), torch.randn(1, 16, 6)
    state["occ"][0, :10] = 0.5  # slots 10.. were never written: they cannot be read
    scores = (q @ state["mk"][0, :10].T)[0] * lane.log_temp.exp()
    top, idx = scores.topk(4, dim=-1)
    ref = torch.einsum("lk,lkd->ld", top.softmax(-1), state["mv"][0, idx])
    with torch.no_grad():
        torch.testing.assert_close(lane._read(q, state)[0], ref)


def test_gates_below_the_threshold_write_nothing() -> None:
    lane = _lane(gate_bias=-30.0)
    _, state = lane(torch.randn(1, 40, 16), lane.init_state(1), 0)
    assert not state["occ"].any() and not state["mk"].any()
    lane = _lane(gate_bias=30.0)
    _, state = lane(torch.randn(1, 40, 16), lane.init_state(1), 0)
    assert (state["occ"] > 0).sum() >= 2


def test_semantic_chunked_equals_stepped() -> None:
    lane = _lane().eval()
    h = torch.randn(2, 50, 16)
    with torch.no_grad():
        whole, s_whole = lane(h, lane.init_state(2), 0)
        steps, state = [], lane.init_state(2)
        for t in range(50):
            r, state = lane(h[:, t : t + 1], state, t)
            steps.append(r)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)
    for k, v in s_whole.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-5)
    assert (s_whole["occ"] > 0).sum() > 2 and whole[:, 8:].abs().sum() > 0  # writes landed and were read


def test_reads_are_trained_through_earlier_writes() -> None:
    torch.manual_seed(0)
    mem = RecurrentSparseMemory(16, 272, _lane())
    x = torch.randn(1, 24, 16)
    y, _ = mem(x, torch.full((1, 24), -1), mem.init_state(1), 0)
    y[:, 8:].sum().backward()  # only reads after the first block landed its writes
    assert mem.sem.proj.weight.grad is not None and mem.sem.proj.weight.grad.abs().sum() > 0
    assert mem.sem.log_temp.grad is not None and mem.beta.grad is not None


def test_semantic_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SemanticLane(16, slots=100)
    with pytest.raises(ValueError, match="write_threshold"):
        SemanticLane(16, write_threshold=1.5)
