"""Synthetic agent transcripts in the control vocabulary, seeded and reproducible.

Skills (each an ``Episode`` of one or more turns):
  arithmetic - a question needing arithmetic or string work: THINK, EXEC code, read the RESULT,
               SPEAK the answer copied from the result
  fact       - a fact told (acknowledged), then asked back later; the fact reaches the context as a
               recalled-memory observation (MEM), and the answer copies it
  calm       - calm sensor readings: WAIT, silence
  alert      - readings out of range: SPEAK an alert naming the reading (sometimes after a
               diagnostic EXEC)
  chat       - greetings and questions it cannot answer: a short honest reply

Templates and values are split into ``train`` and ``heldout`` so evaluation sees phrasings,
names and numbers the model never trained on. Observation texts are rendered by
``models.transcript``, the same functions the daemon uses, so training matches serving.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from models import transcript as tr
from models.tokenizer import DEFAULT as TOK
from models.tokenizer import ID

Split = Literal["train", "heldout"]
SKILLS: tuple[str, ...] = ("arithmetic", "fact", "calm", "alert", "chat")


@dataclass
class Turn:
    """What the agent observed, then what it produced (``steps``), with EXEC results between."""

    observations: list[int]  # tokens fed before the agent acts (OBS / MEM / SENSE spans)
    steps: list[tuple[list[int], list[int]]]  # (agent tokens, result tokens fed after them)


@dataclass
class Episode:
    skill: str
    turns: list[Turn]
    expect: dict[str, str] = field(default_factory=dict)  # what evaluation feeds and checks (question, answer...)

    def sample(self) -> tuple[list[int], list[int]]:
        """Tokens and loss mask: 1 on what the agent produces, 0 on what it observes."""
        tokens: list[int] = []
        mask: list[int] = []
        for turn in self.turns:
            tokens += turn.observations
            mask += [0] * len(turn.observations)
            for agent, result in turn.steps:
                tokens += agent
                mask += [1] * len(agent)
                tokens += result
                mask += [0] * len(result)
        return tokens, mask


def _agent(*parts: tuple[str, str]) -> list[int]:
    """Agent tokens from (control, text) parts: ("THINK", "..."), ("SPEAK", "..."), ("EXEC", code), ("WAIT", "")."""
    out: list[int] = []
    for control, text in parts:
        out.append(ID[control])
        out += TOK.encode(text)
        if control == "EXEC":
            out.append(ID["END_EXEC"])
    return out


# -- vocabulary, split into train / heldout ------------------------------------------------------
_ARITH_Q = {
    "train": ["what is {a} {op} {b}?", "compute {a} {op} {b}", "calculate {a} {op} {b} please", "{a} {op} {b} = ?",
              "how much is {a} {op} {b}?", "can you work out {a} {op} {b}?"],
    "heldout": ["tell me {a} {op} {b}", "what do you get for {a} {op} {b}?", "solve {a} {op} {b}"],
}
_STRING_Q = {
    "train": [("reverse the word {w}", "print({q}[::-1])", "reversed"), ("how many letters are in {w}?", "print(len({q}))", "letters"),
              ("write {w} in capitals", "print({q}.upper())", "upper")],
    "heldout": [("spell {w} backwards", "print({q}[::-1])", "reversed"), ("count the characters of {w}", "print(len({q}))", "letters"),
                ("uppercase {w}", "print({q}.upper())", "upper")],
}
_FACT_NOUNS = {  # subjects are "my <noun>" / "the <noun>"; held-out nouns never appear in training
    "train": ["cat", "dog", "sister", "brother", "landlord", "neighbour", "horse", "robot", "project", "car", "boss",
              "doctor", "teacher", "printer", "laptop", "server", "router", "garden", "friend", "cousin", "parrot",
              "hamster", "team", "band", "house", "ship", "plane", "drone", "guitar", "camera", "phone", "account",
              "password", "locker", "door code", "wifi", "colour", "city", "street", "school"],
    "heldout": ["boat", "manager", "bike", "gate code", "tortoise", "violin", "office", "rabbit"],
}
_FACT_TELL = {
    "train": ["remember that {s} {verb} {v}", "note: {s} {verb} {v}", "please remember {s} {verb} {v}"],
    "heldout": ["keep in mind that {s} {verb} {v}", "for the record, {s} {verb} {v}"],
}
_FACT_ASK = {
    "train": ["what {verb_q}?", "do you remember what {verb_q}?", "tell me what {verb_q}"],
    "heldout": ["remind me what {verb_q}", "what {verb_q} again?"],
}


# More training phrasings, drawn with probability ``paraphrase`` (none of them a held-out one), so
# that a question is recognised by its meaning rather than by one of a few memorised wordings.
_EXTRA = {
    "arith": ["what's {a} {op} {b}?", "please compute {a} {op} {b}", "work out {a} {op} {b}", "{a} {op} {b}?",
              "give me {a} {op} {b}", "find {a} {op} {b}", "what does {a} {op} {b} make?", "evaluate {a} {op} {b}"],
    "string": [("write {w} backwards", "print({q}[::-1])", "reversed"), ("what is {w} reversed?", "print({q}[::-1])", "reversed"),
               ("reverse {w}", "print({q}[::-1])", "reversed"), ("{w} backwards please", "print({q}[::-1])", "reversed"),
               ("how long is the word {w}?", "print(len({q}))", "letters"), ("count the letters in {w}", "print(len({q}))", "letters"),
               ("how many characters does {w} have?", "print(len({q}))", "letters"), ("length of {w}?", "print(len({q}))", "letters"),
               ("make {w} uppercase", "print({q}.upper())", "upper"), ("{w} in upper case", "print({q}.upper())", "upper"),
               ("capitalise every letter of {w}", "print({q}.upper())", "upper")],
    "tell": ["just so you know, {s} {verb} {v}", "fyi {s} {verb} {v}", "don't forget that {s} {verb} {v}",
             "remember this: {s} {verb} {v}"],
    "ask": ["what {verb_q} now?", "say what {verb_q}", "quick question: what {verb_q}?", "do you know what {verb_q}?",
            "any idea what {verb_q}?", "what {verb_q}, please?"],
}


def _subject(rng: random.Random, split: Split, novel: float = 0.0) -> tuple[str, str]:
    """A (subject, verb) pair such as ("my cat", "is named") or ("the door code", "is"). With
    probability ``novel`` (training only) the noun is a made-up word, so answers learn to copy the
    subject from the question instead of recalling a familiar noun."""
    if novel and split == "train" and rng.random() < novel:
        noun = _word(rng, split)
    else:
        noun = _pick(rng, _FACT_NOUNS, split)
    return f"{rng.choice(['my', 'the', 'our'])} {noun}", rng.choice(["is named", "is"])


def _question(s: str, verb: str) -> str:
    """The object of a question about subject ``s``: "is my cat named" / "is the door code"."""
    return f"is {s} named" if verb == "is named" else f"is {s}"


GREETING_REPLY = "Hello! How can I help?"
UNKNOWN_REPLY = "I don't know."
_GREETINGS = {
    "train": ["hello", "hi", "hi there", "hello there", "good morning", "good afternoon", "hey there", "greetings",
              "morning", "hello agent", "hi agent", "yo"],
    "heldout": ["hey", "good evening", "howdy", "hiya"],
}
_UNKNOWN = {  # questions nothing in context can answer
    "train": ["what is the meaning of life?", "who won the game last night?", "what will the weather be tomorrow?",
              "what is the price of gold today?", "who will win the election?", "what am I thinking?",
              "what is in my fridge?", "when is my dentist appointment?", "what did I eat yesterday?",
              "how tall is my neighbour?", "what is the capital of mars?", "where did I park?"],
    "heldout": ["what's the stock price of acme?", "who called me this morning?", "what is my boss's birthday?"],
}
_READINGS = {  # name, comfortable range, unit
    "train": [("temperature", 10.0, 45.0, "C"), ("latency", 0.0, 200.0, "ms"), ("voltage", 11.0, 13.0, "V"),
              ("error_rate", 0.0, 0.05, ""), ("bandwidth", 1.0, 1000.0, "Mbit/s")],
    "heldout": [("temperature", 10.0, 45.0, "C"), ("latency", 0.0, 200.0, "ms"), ("voltage", 11.0, 13.0, "V"),
                ("error_rate", 0.0, 0.05, ""), ("bandwidth", 1.0, 1000.0, "Mbit/s")],
}
_ALERT_SPEAK = {
    "train": ["Alert: {n} is {v}, outside its range.", "Warning: {n} is at {v}.", "Alert: {n} reads {v}."],
    "heldout": ["Alert: {n} is {v}, outside its range.", "Warning: {n} is at {v}."],
}


def _pick(rng: random.Random, table: dict[str, Sequence], split: Split):  # type: ignore[no-untyped-def]
    return rng.choice(table[split])


def _number(rng: random.Random, split: Split) -> int:
    # Wide ranges, so answers must be read from the EXEC result, not remembered.
    return rng.randint(2, 9999) if rng.random() < 0.5 else rng.randint(2, 99)


def _operands(rng: random.Random, split: Split) -> tuple[int, int]:
    """Operand pairs; one pair in ten (by a fixed hash) is held out from training."""
    while True:
        a, b = _number(rng, split), _number(rng, split)
        if ((a * 31 + b) % 10 == 0) == (split == "heldout"):
            return a, b


_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _word(rng: random.Random, split: Split) -> str:
    """A pronounceable made-up word; held-out words end in a vowel, training words in a consonant,
    so the two sets never meet."""
    n = rng.randint(2, 3)
    w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))
    return w if split == "heldout" else w + rng.choice(_CONSONANTS)


def _varied_word(rng: random.Random, open_endings: float = 0.0) -> str:
    """A training word of 1 to 4 syllables. Held-out words are 2 or 3 open syllables (ending in a
    vowel); with probability ``open_endings`` a training word ends in a vowel too, but then has 1 or 4
    syllables, so the model learns to copy vowel endings without ever seeing a held-out word."""
    if open_endings and rng.random() < open_endings:
        n = rng.choice((1, 4))
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))
    n = rng.randint(1, 4)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CONSONANTS)


def _varied_value(rng: random.Random, open_endings: float = 0.0) -> str:
    """A training value of varied length and shape, so that an answer copies a value to its end
    rather than stopping where training values usually stop. Still apart from held-out values:
    words end in a consonant, codes never end in X, 4-5 digit numbers never end in 0."""
    r = rng.random()
    if r < 0.4:
        return _varied_word(rng, open_endings).capitalize()
    if r < 0.7 and open_endings and rng.random() < open_endings:
        # Ends in X like held-out codes, but its second number has 3-4 digits (held-out: 2).
        return f"{rng.choice(_CONSONANTS).upper()}{rng.randint(1, 9999)}-{rng.randint(100, 9999)}X"
    if r < 0.7:
        code = f"{rng.choice(_CONSONANTS).upper()}{rng.randint(1, 9999)}-{rng.randint(1, 9999)}"
        return code + rng.choice("ABCDEFGHJKLMNPRSTUVWYZ") if rng.random() < 0.5 else code
    digits = str(rng.randint(10, 999999))
    if len(digits) in (4, 5) and digits.endswith("0"):
        digits = digits[:-1] + str(rng.randint(1, 9))
    return digits


def _value(rng: random.Random, split: Split) -> str:
    """A fact's value: a capitalised name, a code, or a number (held-out ones built apart, see _word)."""
    r = rng.random()
    if r < 0.5:
        return _word(rng, split).capitalize()
    if r < 0.75:
        code = f"{rng.choice(_CONSONANTS).upper()}{rng.randint(1, 99)}-{rng.randint(10, 99)}"
        return code if split == "train" else code + "X"
    return str(rng.randint(100, 9999)) + ("" if split == "train" else "0")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"


class EpisodeGenerator:
    """Reproducible episodes: the same (seed, split) always gives the same sequence."""

    def __init__(self, seed: int = 0, split: Split = "train", novel_subjects: float = 0.0, varied_values: float = 0.0,
                 paraphrase: float = 0.0, open_endings: float = 0.0) -> None:
        self.split = split
        self.novel = novel_subjects
        self.varied = varied_values
        self.paraphrase = paraphrase
        self.open_endings = open_endings
        self.rng = random.Random(f"{seed}:{split}")

    def _phrase(self, rng: random.Random, table: dict[str, Sequence], extra: str):  # type: ignore[no-untyped-def]
        if self.paraphrase and self.split == "train" and rng.random() < self.paraphrase:
            return rng.choice(_EXTRA[extra])
        return _pick(rng, table, self.split)

    def _vary(self, rng: random.Random) -> bool:
        return bool(self.varied) and self.split == "train" and rng.random() < self.varied

    def _value(self, rng: random.Random) -> str:
        return _varied_value(rng, self.open_endings) if self._vary(rng) else _value(rng, self.split)

    # -- skills --------------------------------------------------------------------------------
    def arithmetic(self, rng: random.Random) -> Episode:
        split = self.split
        if rng.random() < 0.6:
            a, b = _operands(rng, split)
            op = rng.choice(["+", "-", "*"])
            question = self._phrase(rng, _ARITH_Q, "arith").format(a=a, b=b, op=op)
            code = f"print({a} {op} {b})"
            answer = str(eval(f"{a} {op} {b}"))  # noqa: S307 - integers and one operator we just made
            speak = f"{a} {op} {b} = {answer}"
        else:
            q_tpl, code_tpl, _ = self._phrase(rng, _STRING_Q, "string")
            w = _varied_word(rng, self.open_endings) if self._vary(rng) else _word(rng, split)
            question = q_tpl.format(w=w)
            code = code_tpl.format(q=repr(w))
            answer = str(eval(code[len("print("):-1]))  # noqa: S307 - a string method on a literal
            speak = f"The answer is {answer}."
        first = _agent(("THINK", "I will compute it."), ("EXEC", code))
        result = tr.exec_result_tokens(stdout=answer + "\n", stderr="", exit_code=0)
        second = _agent(("SPEAK", speak), ("WAIT", ""))
        return Episode("arithmetic", [Turn(tr.chat_tokens(question), [(first, result), (second, [])])],
                       {"answer": answer, "code": code, "question": question})

    def fact(self, rng: random.Random) -> Episode:
        split = self.split
        s, verb = _subject(rng, split, self.novel)
        v = self._value(rng)
        tell = self._phrase(rng, _FACT_TELL, "tell").format(s=s, verb=verb, v=v)
        ask = self._phrase(rng, _FACT_ASK, "ask").format(verb_q=_question(s, verb))
        # The daemon remembers what it was told verbatim, so recall brings back the told sentence,
        # among other memories that are not the answer.
        others = [o for o in (_subject(rng, split, self.novel) for _ in range(rng.randint(0, 2))) if o[0] != s]
        distractors = [_pick(rng, _FACT_TELL, split).format(s=ds, verb=dv, v=self._value(rng)) for ds, dv in others]
        recalled = [tell, *distractors]
        rng.shuffle(recalled)
        told = Turn(tr.chat_tokens(tell), [(_agent(("SPEAK", "Noted."), ("WAIT", "")), [])])
        asked = Turn(tr.memory_tokens(recalled) + tr.chat_tokens(ask),
                     [(_agent(("SPEAK", f"{s[0].upper() + s[1:]} {verb} {v}."), ("WAIT", "")), [])])
        return Episode("fact", [told, asked], {"answer": v, "tell": tell, "ask": ask, "distractors": "\n".join(distractors)})

    def _readings(self, rng: random.Random, out_of_range: bool) -> tuple[dict[str, float], str | None]:
        chosen = rng.sample(self._reading_table(), rng.randint(1, 3))
        values: dict[str, float] = {}
        for name, lo, hi, _unit in chosen:
            values[name] = round(rng.uniform(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)), 3)
        bad = None
        if out_of_range:
            name, lo, hi, _unit = rng.choice(chosen)
            span = hi - lo
            values[name] = round(hi + rng.uniform(0.2, 2.0) * span if rng.random() < 0.7 or lo <= 0 else lo - rng.uniform(0.2, 0.9) * lo, 3)
            bad = name
        return values, bad

    def _reading_table(self) -> list[tuple[str, float, float, str]]:
        return _READINGS[self.split]

    def calm(self, rng: random.Random) -> Episode:
        values, _ = self._readings(rng, out_of_range=False)
        ranges = {n: (lo, hi) for n, lo, hi, _u in self._reading_table()}
        return Episode("calm", [Turn(tr.sense_tokens(values, ranges, "calm"), [(_agent(("WAIT", "")), [])])],
                       {"values": json.dumps(values)})

    def alert(self, rng: random.Random) -> Episode:
        values, bad = self._readings(rng, out_of_range=True)
        assert bad is not None
        ranges = {n: (lo, hi) for n, lo, hi, _u in self._reading_table()}
        speak = _pick(rng, _ALERT_SPEAK, self.split).format(n=bad, v=_fmt(values[bad]))
        steps: list[tuple[list[int], list[int]]] = [(_agent(("THINK", f"{bad} is out of range."), ("SPEAK", speak), ("WAIT", "")), [])]
        felt = rng.choice(["alert", "urgent"])
        return Episode("alert", [Turn(tr.sense_tokens(values, ranges, felt), steps)], {"reading": bad, "values": json.dumps(values)})

    def chat(self, rng: random.Random) -> Episode:
        if rng.random() < 0.5:
            q, a = _pick(rng, _GREETINGS, self.split), GREETING_REPLY
        else:
            q, a = _pick(rng, _UNKNOWN, self.split), UNKNOWN_REPLY
        if rng.random() < 0.3:
            q = q.capitalize()
        return Episode("chat", [Turn(tr.chat_tokens(q), [(_agent(("SPEAK", a), ("WAIT", "")), [])])], {"answer": a, "question": q})

    def noise_memories(self, rng: random.Random) -> list[int]:
        """A MEM observation of one or two told facts unrelated to the question at hand."""
        lines = []
        for _ in range(rng.randint(1, 2)):
            s, verb = _subject(rng, self.split, self.novel)
            lines.append(_pick(rng, _FACT_TELL, self.split).format(s=s, verb=verb, v=self._value(rng)))
        return tr.memory_tokens(lines)

    # -- sampling ------------------------------------------------------------------------------
    def episode(self, rng: random.Random | None = None, skill: str | None = None) -> Episode:
        rng = rng or self.rng
        skill = skill or rng.choice(SKILLS)
        return getattr(self, skill)(rng)


class AgentCurriculum:
    """The training curriculum (see models.train.Curriculum) over EpisodeGenerator, optionally mixing
    windows of user text files into the generative stages."""

    def __init__(self, seed: int = 0, texts: Sequence[str] = (), text_mix: float = 0.1,
                 weights: dict[str, float] | None = None, mem_noise: float = 0.0, novel_subjects: float = 0.0,
                 varied_values: float = 0.0, paraphrase: float = 0.0, open_endings: float = 0.0) -> None:
        self.gen = EpisodeGenerator(seed, "train", novel_subjects, varied_values, paraphrase, open_endings)
        self.texts = [t.encode("utf-8") for t in texts if t]
        self.text_mix = text_mix if self.texts else 0.0
        # Skill weights (uniform when None): the copy-heavy skills need more practice.
        self.weights = [float((weights or {}).get(s, 1.0 if weights is None else 0.0)) for s in SKILLS]
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"skill weights must be non-negative with a positive sum, got {weights}")
        # How often a chat turn is preceded by recalled memories that are not its answer, as the
        # daemon's recall does once it has a history.
        self.mem_noise = mem_noise

    def _episode(self, rng: random.Random) -> Episode:
        skill = rng.choices(SKILLS, weights=self.weights)[0]
        ep = self.gen.episode(rng, skill)
        if self.mem_noise and skill in ("arithmetic", "chat") and rng.random() < self.mem_noise:
            ep.turns[0].observations = self.gen.noise_memories(rng) + ep.turns[0].observations
        return ep

    def _text(self, rng: random.Random, n: int) -> tuple[list[int], list[int]]:
        blob = rng.choice(self.texts)
        start = rng.randrange(max(1, len(blob) - n))
        ids = list(blob[start : start + n])
        return ids, [1] * len(ids)

    def segment(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One turn of an episode (the last, which holds the skill's answer)."""
        ep = self._episode(rng)
        return Episode(ep.skill, ep.turns[-1:]).sample()

    def episode(self, rng: random.Random) -> tuple[list[int], list[int]]:
        if self.text_mix and rng.random() < self.text_mix:
            return self._text(rng, 256)
        return self._episode(rng).sample()

    def stream(self, rng: random.Random, n_tokens: int) -> tuple[list[int], list[int]]:
        """Episodes back to back, with facts told early and asked much later in the same stream."""
        tokens: list[int] = []
        mask: list[int] = []
        while len(tokens) < n_tokens:
            if self.text_mix and rng.random() < self.text_mix:
                t, m = self._text(rng, 128)
            else:
                t, m = self._episode(rng).sample()
            tokens += t
            mask += m
        return tokens[:n_tokens], mask[:n_tokens]
