"""The synthetic episodes: reproducible, held-out values apart from training ones, curriculum knobs."""

from __future__ import annotations

import random

import pytest

from models.data import AgentCurriculum, EpisodeGenerator
from models.tokenizer import DEFAULT as TOK


def test_same_seed_same_episodes_and_the_splits_differ() -> None:
    a = [EpisodeGenerator(3, "train").episode().sample() for _ in range(20)]
    b = [EpisodeGenerator(3, "train").episode().sample() for _ in range(20)]
    assert a == b
    for skill in ("arithmetic", "fact", "chat"):
        tr = EpisodeGenerator(0, "train").episode(random.Random(1), skill)
        ho = EpisodeGenerator(0, "heldout").episode(random.Random(1), skill)
        assert tr.skill == ho.skill == skill and tr.expect != ho.expect


def test_held_out_answers_never_occur_in_training() -> None:
    train, held = EpisodeGenerator(0, "train"), EpisodeGenerator(0, "heldout")
    rng = random.Random(0)
    seen = {train.episode(rng, "fact").expect["answer"] for _ in range(400)}
    for _ in range(50):
        ep = held.episode(rng, "fact")
        assert ep.expect["answer"] not in seen, ep.expect
        assert ep.expect["tell"] and ep.expect["ask"]


def test_hash_split_keeps_values_apart_but_shows_every_shape() -> None:
    from models.data import _value, _word, held_out

    rng = random.Random(0)
    train = [_value(rng, "train") for _ in range(2000)] + [_word(rng, "train") for _ in range(500)]
    held = [_value(rng, "heldout") for _ in range(300)] + [_word(rng, "heldout") for _ in range(100)]
    assert not any(held_out(v) for v in train) and all(held_out(v) for v in held)
    # The held-out shapes occur in training (with other values), so copying them is practised.
    assert any(v.endswith("X") and "-" in v for v in train)
    assert any(v[-1] in "aeiou" and 4 <= len(v) <= 6 for v in train)
    assert any(v.isdigit() and v.endswith("0") and len(v) == 5 for v in train)


def test_training_phrasings_of_string_work_never_are_held_out_ones() -> None:
    from models.data import _OPENERS, _STRING_FRAMES, _STRING_Q, _string_phrasing

    held = {q for q, _, _ in _STRING_Q["heldout"]}
    frames = [f.replace("{o}", o) for fs in _STRING_FRAMES.values() for f in fs for o in _OPENERS]
    assert not held & set(frames)
    assert not [f for f in frames if f.startswith(("spell", "uppercase", "count the characters"))]
    rng = random.Random(0)
    drawn = {_string_phrasing(rng) for _ in range(3000)}
    assert {code for _, code in drawn} == set(_STRING_FRAMES) and len(drawn) > 500
    assert not held & {q for q, _ in drawn}
    assert not [q for q, _ in drawn if "spell" in q.split() or q.split(" ", 1)[0] in ("uppercase", "count")]
    kw = {_string_phrasing(rng, keyword_first=1.0) for _ in range(1000)}
    assert not held & {q for q, _ in kw} and any(q.startswith("in uppercase, ") for q, _ in kw)
    assert not [q for q, _ in kw if "spell" in q.split() or q.split(" ", 1)[0] in ("uppercase", "count")]
    gen = EpisodeGenerator(0, "train", paraphrase=1.0)
    questions = [gen.episode(rng, "arithmetic").expect["question"] for _ in range(200)]
    assert any("backwards" in q for q in questions) and any("characters" in q for q in questions)


def test_the_agent_says_only_what_is_masked_in() -> None:
    ep = EpisodeGenerator(0).episode(random.Random(2), "arithmetic")
    tokens, mask = ep.sample()
    said = TOK.decode([t for t, m in zip(tokens, mask, strict=True) if m])
    heard = TOK.decode([t for t, m in zip(tokens, mask, strict=True) if not m])
    assert "<exec>" in said and ep.expect["answer"] in said and "<result>" in heard and ep.expect["question"] in heard


def test_skill_weights_and_novel_subjects() -> None:
    cur = AgentCurriculum(0, weights={"fact": 1.0}, novel_subjects=1.0)
    rng = random.Random(0)
    texts = [TOK.decode(cur.episode(rng)[0]) for _ in range(30)]
    assert all("Noted." in t for t in texts)  # only fact episodes
    from models.data import _FACT_NOUNS

    nouns = set(_FACT_NOUNS["train"])
    asked = [t.rsplit("<speak>", 1)[1] for t in texts]
    assert not any(f" {n} " in a for a in asked for n in nouns)  # every subject made up
    with pytest.raises(ValueError):
        AgentCurriculum(0, weights={"fact": 0.0})


def test_memory_noise_precedes_some_chat_turns() -> None:
    cur = AgentCurriculum(0, weights={"chat": 1.0, "arithmetic": 1.0}, mem_noise=1.0)
    rng = random.Random(0)
    assert all(TOK.decode(cur.episode(rng)[0]).startswith("<memory>") for _ in range(10))
