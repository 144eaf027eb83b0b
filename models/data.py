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
names and numbers the model never trained on: held-out templates and fact subjects are lists of
their own, held-out words and values are the one in eight that ``held_out`` picks by hash.
Observation texts are rendered by ``models.transcript``, the same functions the daemon uses, so
training matches serving.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Sequence
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
# The extra training phrasings of string work (drawn with probability ``paraphrase``): each operation
# in many frames, its keyword before or after the word, so the operation is read from the keyword
# wherever it sits and the word is told apart from the frame around it. None is a held-out phrasing,
# none opens with a held-out phrasing's first word ("spell", "uppercase", "count").
_OPENERS = ["write", "say", "give me", "show me", "print", "type", "read", "put", "render", "output", "now write",
            "please write", "can you write", "could you say", "try writing", "display", "show", "produce", "return",
            "echo", "list", "write out", "type out", "read out", "jot down", "shout", "whisper", "recite", "copy",
            "present", "draw", "format", "emit", "send me", "post", "scribble"]
_HELD_OUT_OPENERS = ("spell", "uppercase", "count")  # the held-out phrasings' first words: never a training opener
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "sp", "pl", "tr", "br", "gr", "fl",
           "sk", "cl", "dr", "pr", "sh", "ch", "th", "wr", "sn"]
_CODAS = ["", "n", "t", "ll", "nd", "st", "nk", "mp", "ss", "rt", "ng", "ck", "lt", "sk", "ft", "rd", "sh"]
_PREFIXES = ["", "", "", "", "please ", "hey, ", "ok, ", "now ", "quick one: "]
_STRING_FRAMES = {
    "print({q}[::-1])": [
        "{o} {w} backwards", "{o} {w} reversed", "{o} {w} in reverse", "{o} {w} back to front", "{o} the word {w} backwards",
        "{o} {w} in reverse order", "{w} backwards", "{w} reversed", "what is {w} reversed?", "what is {w} backwards?",
        "reverse {w}", "reverse the word {w}", "reverse the letters of {w}", "{w} backwards please",
        "how does {w} read backwards?", "flip {w} around", "{w} the other way round"],
    "print({q}.upper())": [
        "{o} {w} in capitals", "{o} {w} in uppercase", "{o} {w} in upper case", "{o} {w} in caps",
        "{o} {w} in capital letters", "{o} {w} in all caps", "{o} {w} uppercased", "{w} in uppercase",
        "{w} in capitals please", "make {w} uppercase", "turn {w} uppercase", "convert {w} to uppercase",
        "convert {w} to upper case", "capitalise {w}", "capitalize every letter of {w}", "what is {w} in uppercase?",
        "{w} uppercase please", "change {w} to capitals"],
    "print(len({q}))": [
        "how many letters are in {w}?", "how many characters are in {w}?", "how many chars in {w}?",
        "how many letters does {w} have?", "how many characters does {w} have?", "tally the letters in {w}",
        "number of letters in {w}?", "number of characters in {w}?", "tell me the number of characters in {w}",
        "how long is {w}?", "how long is the word {w}?", "length of {w}?", "what is the length of {w}?",
        "what is the character count of {w}?", "{w} has how many characters?", "give me the letter count of {w}",
        "the length of {w}, please"],
}


def _made_up_opener(rng: random.Random) -> str:
    """A made-up verb of any shape ("strunk", "bomi"), so that the word worked on is found by its
    place in the phrasing, not by being the one word the model does not know."""
    while True:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 2)))
        if w not in _HELD_OUT_OPENERS:
            return w


# Phrasings whose keyword comes before the word without opening the question: a keyword is not
# always after the word it names ("make X uppercase"), nor is the word after it always its first
# letters ("in uppercase, write X"). Drawn with probability ``keyword_first``.
_KEYWORD_FIRST_FRAMES = {
    "print({q}[::-1])": [
        "in reverse, {o} {w}", "the reverse of {w}", "backwards, {o} {w}", "{o} backwards: {w}", "{o} in reverse: {w}",
        "what is the reverse of {w}?", "give me the reversed {w}", "a backwards {w}, please", "reversed: {w}"],
    "print({q}.upper())": [
        "in uppercase, {o} {w}", "the uppercase of {w}", "the uppercase form of {w}", "{o} in uppercase: {w}",
        "in capitals, {o} {w}", "{o} in caps: {w}", "what is the uppercase of {w}?", "an uppercase {w}, please",
        "all caps: {w}", "capitals: {w}"],
    "print(len({q}))": [
        "the character count of {w}", "letters in {w}, how many?", "{o} the length of {w}", "{o} the letter count of {w}",
        "length: {w}", "the number of letters in {w}", "in letters, how long is {w}?"],
}


def _string_phrasing(rng: random.Random, keyword_first: float = 0.0) -> tuple[str, str]:
    """An extra training phrasing of string work: (question template with {w}, code template with {q})."""
    frames = _KEYWORD_FIRST_FRAMES if keyword_first and rng.random() < keyword_first else _STRING_FRAMES
    code = rng.choice(list(frames))
    opener = rng.choice(_OPENERS) if rng.random() < 0.6 else _made_up_opener(rng)
    return rng.choice(_PREFIXES) + rng.choice(frames[code]).replace("{o}", opener), code


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


def held_out(value: str) -> bool:
    """Whether a word or value belongs to evaluation: one in eight, by a fixed hash. Training never
    draws one, so every held-out value is new to the model, while training still shows every shape
    (any length, open or closed endings, codes with or without a letter) and an answer must copy a
    value to its end instead of stopping where training values usually stop."""
    return zlib.crc32(value.lower().encode()) % 8 == 0


def _split_draw(rng: random.Random, split: Split, make: Callable[[random.Random], str]) -> str:
    while True:
        v = make(rng)
        if held_out(v) == (split == "heldout"):
            return v


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))


def _word(rng: random.Random, split: Split) -> str:
    """A pronounceable made-up word. Held-out words are 2 or 3 open syllables ("vahele"); training
    words are 1 to 4 syllables, open or closed ("ba", "tivok")."""
    if split == "heldout":
        return _split_draw(rng, split, lambda r: _syllables(r, r.randint(2, 3)))
    return _split_draw(rng, split, lambda r: _syllables(r, r.randint(1, 4)) + (r.choice(_CONSONANTS) if r.random() < 0.5 else ""))


def _code(rng: random.Random, split: Split) -> str:
    """A code. Held-out: "P76-74X"; training: a letter, 1-4 digits, a dash, 1-4 digits, and
    sometimes a closing letter (X among them)."""
    if split == "heldout":
        return _split_draw(rng, split, lambda r: f"{r.choice(_CONSONANTS).upper()}{r.randint(1, 99)}-{r.randint(10, 99)}X")

    def make(r: random.Random) -> str:
        code = f"{r.choice(_CONSONANTS).upper()}{r.randint(1, 10 ** r.randint(1, 4) - 1)}-{r.randint(1, 10 ** r.randint(1, 4) - 1)}"
        return code + r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") if r.random() < 0.4 else code

    return _split_draw(rng, split, make)


def _digits(rng: random.Random, split: Split) -> str:
    """A number value. Held-out: 4 or 5 digits ending in 0; training: 2 to 6 digits."""
    if split == "heldout":
        return _split_draw(rng, split, lambda r: str(r.randint(100, 9999)) + "0")
    return _split_draw(rng, split, lambda r: str(r.randint(10, 10 ** r.randint(2, 6) - 1)))


def _value(rng: random.Random, split: Split) -> str:
    """A fact's value: a capitalised name, a code, or a number."""
    r = rng.random()
    if r < 0.5:
        return _word(rng, split).capitalize()
    return _code(rng, split) if r < 0.75 else _digits(rng, split)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"


class EpisodeGenerator:
    """Reproducible episodes: the same (seed, split) always gives the same sequence."""

    def __init__(self, seed: int = 0, split: Split = "train", novel_subjects: float = 0.0, paraphrase: float = 0.0,
                 keyword_first: float = 0.0) -> None:
        self.split = split
        self.novel = novel_subjects
        self.paraphrase = paraphrase
        self.keyword_first = keyword_first
        self.rng = random.Random(f"{seed}:{split}")

    def _extra(self, rng: random.Random) -> bool:
        """Whether this question or told fact takes an extra training phrasing (never in held-out)."""
        return bool(self.paraphrase) and self.split == "train" and rng.random() < self.paraphrase

    def _phrase(self, rng: random.Random, table: dict[str, Sequence], extra: str):  # type: ignore[no-untyped-def]
        if self._extra(rng):
            return rng.choice(_EXTRA[extra])
        return _pick(rng, table, self.split)

    # -- skills --------------------------------------------------------------------------------
    def arithmetic(self, rng: random.Random) -> Episode:
        split = self.split
        # Training asks for string work more often than evaluation does (55% against 40%): numbers
        # are learnt early, finding and copying the word takes longer.
        if rng.random() < (0.6 if split == "heldout" else 0.45):
            a, b = _operands(rng, split)
            op = rng.choice(["+", "-", "*"])
            question = self._phrase(rng, _ARITH_Q, "arith").format(a=a, b=b, op=op)
            code = f"print({a} {op} {b})"
            answer = str(eval(f"{a} {op} {b}"))  # noqa: S307 - integers and one operator we just made
            speak = f"{a} {op} {b} = {answer}"
        else:
            if self._extra(rng):
                q_tpl, code_tpl = _string_phrasing(rng, self.keyword_first)
            else:
                q_tpl, code_tpl, _ = _pick(rng, _STRING_Q, split)
            w = _word(rng, split)
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
        v = _value(rng, split)
        tell = self._phrase(rng, _FACT_TELL, "tell").format(s=s, verb=verb, v=v)
        ask = self._phrase(rng, _FACT_ASK, "ask").format(verb_q=_question(s, verb))
        # The daemon remembers what it was told verbatim, so recall brings back the told sentence,
        # among other memories that are not the answer.
        others = [o for o in (_subject(rng, split, self.novel) for _ in range(rng.randint(0, 2))) if o[0] != s]
        distractors = [_pick(rng, _FACT_TELL, split).format(s=ds, verb=dv, v=_value(rng, split)) for ds, dv in others]
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
            lines.append(_pick(rng, _FACT_TELL, self.split).format(s=s, verb=verb, v=_value(rng, self.split)))
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
                 paraphrase: float = 0.0, keyword_first: float = 0.0) -> None:
        self.gen = EpisodeGenerator(seed, "train", novel_subjects, paraphrase, keyword_first)
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
