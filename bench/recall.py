"""Needle recall over long streams: the Recurrent Sparse Memory and the nexus backbone.

RULER-style: K key→value needles (" The pass code of qzxkfmwp is 4827163. ", values 7-digit or
UUID) are placed at 40 depths of a filler stream, the stream is fed through in chunks with the
state carried, and then each key is asked for ("The pass code of qzxkfmwp is ") and the greedy
continuation must reproduce the value exactly. Fillers:

* ``repeated``    RULER's mechanical haystack ("The grass is green. The sky is blue. ...")
* ``prose``       real prose: the repository's own Markdown (README, docs, bench), cycled
* ``distractors`` prose plus a same-format needle with a fresh key and value every
                  ``--distractor-every`` tokens, never asked for: competition for the slots

Three readers of the same stream:

* ``lane``         the lexical lane of the Recurrent Sparse Memory alone (models.rsm.LexicalLane,
                   nexus's defaults: 65536 slots, 12-gram keys), decoding with ``complete``
* ``nexus``        the whole nexus backbone (default config, untrained: the lane's copy vote on the
                   logits is what recalls; greedy decoding through ``forward``/``step``)
* ``window_only``  nexus without memory (``PRESETS["window_only"]``): sliding-window attention
                   only, which cannot see a needle that has left its window

``val/slot`` in the table is the needles' value tokens per lexical slot: every value token needs a
slot of its own, so above 1 the needles cannot all fit (filler n-grams compete for slots too).

Each setting runs ``--repeats`` times with different seeds (needles, keys, values, placement);
the table gives the median recall and [min, max]. The seed's claims (001_*.txt): 100% at 512k
tokens on mechanical needles, 85.64% on natural ones.

    .venv/bin/python bench/recall.py                              # the full sweep (long: an hour+)
    .venv/bin/python bench/recall.py --quick                      # minutes
    .venv/bin/python bench/recall.py --readers lane --lengths 524288 --needles 100
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import string
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import models
from models.base import State
from models.nexus import PRESETS
from models.rsm import LexicalLane
from models.tokenizer import DEFAULT as TOKENIZER

ROOT = Path(__file__).resolve().parent.parent
PROSE_FILES = ("README.md", "bench/README.md", "docs")  # Markdown shipped in the repository
MECHANICAL = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = 40
READERS = ("lane", "nexus", "window_only")
FILLERS = ("repeated", "prose", "distractors")
VALUES = ("7digit", "uuid")
VALUE_LEN = {"7digit": 7, "uuid": 36}  # tokens: each needs a slot of its own, so K * len / slots > 1 cannot fit
SEED_CLAIM = {"repeated": "100% @512k (mechanical)", "prose": "85.64% (natural)", "distractors": "85.64% (natural)"}


@dataclass(frozen=True)
class Setting:
    length: int  # filler tokens; the needles come on top
    filler: str
    value: str
    needles: int


@dataclass
class Haystack:
    tokens: Tensor  # [1, N] the whole stream
    keys: list[str]
    values: list[str]
    depths: list[int]  # the depth bucket (0..DEPTHS-1) of each needle


def needle(key: str, value: str) -> str:
    return f" The pass code of {key} is {value}. "


def query(key: str) -> str:
    return f" The pass code of {key} is "


def _key(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=8))


def _value(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randrange(1_000_000, 10_000_000))


def prose_text() -> str:
    parts = []
    for name in PROSE_FILES:
        p = ROOT / name
        files = sorted(p.rglob("*.md")) if p.is_dir() else [p]
        parts += [f.read_text(encoding="utf-8") for f in files if f.is_file()]
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise SystemExit(f"recall: too little prose under {ROOT} ({len(text)} chars) for the prose filler")
    return text


def filler_stream(kind: str, rng: random.Random, distractor_every: int, value_kind: str) -> Iterator[int]:
    """Endless filler tokens of ``kind``."""
    base = TOKENIZER.encode(MECHANICAL if kind == "repeated" else prose_text())
    if kind != "distractors":
        yield from itertools.cycle(base)
        return
    start = rng.randrange(len(base))
    for i in itertools.count():
        for j in range(distractor_every):
            yield base[(start + i * distractor_every + j) % len(base)]
        yield from TOKENIZER.encode(needle(_key(rng), _value(rng, value_kind)))


def haystack(s: Setting, seed: int, distractor_every: int) -> Haystack:
    """``s.length`` filler tokens with ``s.needles`` needles spread over DEPTHS depth buckets."""
    rng = random.Random(seed)
    per_bucket = -(-s.needles // DEPTHS)
    keys: set[str] = set()
    placed: list[tuple[int, str, str, int]] = []
    for j in range(s.needles):
        b, r = j % DEPTHS, j // DEPTHS
        at = int(s.length * (b + (r + 0.5) / per_bucket) / DEPTHS)
        while (k := _key(rng)) in keys:
            pass
        keys.add(k)
        placed.append((at, k, _value(rng, s.value), b))
    placed.sort()
    fill = filler_stream(s.filler, rng, distractor_every, s.value)
    out: list[int] = []
    n = 0
    for at, k, v, _ in placed:
        out += itertools.islice(fill, at - n)
        n = at
        out += TOKENIZER.encode(needle(k, v))
    out += itertools.islice(fill, s.length - n)
    return Haystack(torch.tensor([out]), [p[1] for p in placed], [p[2] for p in placed], [p[3] for p in placed])


# -- readers: each returns the decoded continuation of every query ----------------------------------
def _batched(state: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    """The batch-1 ``state`` repeated to batch ``b`` (every tensor is [B, ...])."""
    return {k: v.expand(b, *v.shape[1:]).contiguous() for k, v in state.items()}


def read_lane(h: Haystack, chunk: int, batch: int, progress: Callable[[int], None]) -> list[str]:
    lane = LexicalLane(models.tokenizer.VOCAB_SIZE, block=128)
    state = lane.init_state(1)
    pos = 0
    with torch.no_grad():
        for s in range(0, h.tokens.shape[1], chunk):
            _, state = lane(h.tokens[:, s : s + chunk], state, pos)
            pos = min(pos + chunk, h.tokens.shape[1])
            progress(pos)
        out: list[str] = []
        width = len(h.values[0])
        for i in range(0, len(h.keys), batch):
            keys = h.keys[i : i + batch]
            prompt = torch.tensor([TOKENIZER.encode(query(k)) for k in keys])
            ids = lane.complete(prompt, _batched(state, len(keys)), pos, width)
            out += [TOKENIZER.decode([t for t in row if t >= 0]) for row in ids.tolist()]
    return out


def read_backbone(bb: models.Backbone, h: Haystack, chunk: int, batch: int, progress: Callable[[int], None]) -> list[str]:
    state = bb.init_state(1)
    with torch.inference_mode():
        for s in range(0, h.tokens.shape[1], chunk):
            _, state = bb.forward(h.tokens[:, s : s + chunk], state)
            progress(min(s + chunk, h.tokens.shape[1]))
        out: list[str] = []
        width = len(h.values[0])
        for i in range(0, len(h.keys), batch):
            keys = h.keys[i : i + batch]
            prompt = torch.tensor([TOKENIZER.encode(query(k)) for k in keys])
            st = State(_batched(state, len(keys)), state.meta)
            logits, st = bb.forward(prompt, st)
            tok = logits[:, -1].argmax(-1)
            got = [tok]
            for _ in range(width - 1):
                logits, st = bb.step(tok, st)
                tok = logits.argmax(-1)
                got.append(tok)
            out += [TOKENIZER.decode(row, controls=False) for row in torch.stack(got, 1).tolist()]
    return out


def make_reader(name: str) -> Callable[[Haystack, int, int, Callable[[int], None]], list[str]]:
    if name == "lane":
        return read_lane
    torch.manual_seed(0)
    bb = models.build("nexus", **(PRESETS["window_only"] if name == "window_only" else {}))
    bb.eval()
    return lambda h, chunk, batch, progress: read_backbone(bb, h, chunk, batch, progress)


# -- the run ----------------------------------------------------------------------------------------
class Progress:
    """One self-overwriting stderr line per stream: tokens fed, tokens/s."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.t0, self.last = label, total, time.perf_counter(), 0.0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.5 and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r  {self.label}: {done:,}/{self.total:,} tokens, {rate:,.0f} tok/s ")
        sys.stderr.flush()
        if done >= self.total:
            sys.stderr.write("\n")


def fmt_k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS))
    p.add_argument("--lengths", nargs="+", type=int, default=[65536, 524288, 1048576],
                   help="filler tokens per stream (default: 64k 512k 1M)")
    p.add_argument("--model-lengths", nargs="+", type=int,
                   help="lengths for the nexus and window_only readers (default: --lengths); they are ~100x slower than the lane")
    p.add_argument("--fillers", nargs="+", choices=FILLERS, default=list(FILLERS))
    p.add_argument("--values", nargs="+", choices=VALUES, default=list(VALUES))
    p.add_argument("--needles", nargs="+", type=int, default=[100, 1000], help="needles per stream (default: 100 1000)")
    p.add_argument("--model-needles", nargs="+", type=int, help="needle counts for the model readers (default: --needles)")
    p.add_argument("--repeats", type=int, default=3, help="seeds per setting (default: 3)")
    p.add_argument("--distractor-every", type=int, default=2048, help="filler tokens between distractor needles")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per forward call")
    p.add_argument("--batch", type=int, default=50, help="queries decoded together")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: lengths 64k and 512k, 7-digit values, 100 needles, 1 repeat, models at 64k only")
    a = p.parse_args(argv)
    if a.quick:
        a.lengths, a.values, a.needles, a.repeats = [65536, 524288], ["7digit"], [100], 1
        a.model_lengths = a.model_lengths or [65536]
    a.model_lengths = a.model_lengths or a.lengths
    a.model_needles = a.model_needles or a.needles
    if min(a.lengths + a.model_lengths) < 1 or min(a.needles + a.model_needles) < 1 or a.repeats < 1:
        p.error("lengths, needle counts and repeats must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    lex_slots = LexicalLane(models.tokenizer.VOCAB_SIZE).slots
    rows: list[tuple[str, Setting, list[float]]] = []
    readers = {name: make_reader(name) for name in a.readers}
    for length, filler, value, k in itertools.product(a.lengths, a.fillers, a.values, a.needles):
        s = Setting(length, filler, value, k)
        names = [n for n in a.readers if n == "lane" or (length in a.model_lengths and k in a.model_needles)]
        if not names:
            continue
        scores: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(a.repeats):
            h = haystack(s, seed=1000 * rep + 7, distractor_every=a.distractor_every)
            for name in names:
                label = f"{name} {fmt_k(length)} {filler} {value} K={k} seed {rep}"
                got = readers[name](h, a.chunk, a.batch, Progress(label, h.tokens.shape[1]))
                hits = [g == v for g, v in zip(got, h.values, strict=True)]
                scores[name].append(100.0 * sum(hits) / len(hits))
                missed = sorted({d for d, ok in zip(h.depths, hits, strict=True) if not ok})
                print(f"  {label}: {scores[name][-1]:.1f}%" + (f" (missed at depth buckets {missed[:10]})" if missed else ""),
                      file=sys.stderr)
        rows += [(n, s, scores[n]) for n in names]

    print(f"\nrecall: exact value after the key, greedy; median [min, max] over {a.repeats} seed(s); "
          f"lane slots {lex_slots}; torch threads {a.threads}")
    print(f"{'reader':<12} {'length':>7} {'filler':<12} {'value':<7} {'needles':>7} {'val/slot':>8} {'recall %':>20}  seed claim")
    for name, s, sc in rows:
        med = statistics.median(sc)
        print(f"{name:<12} {fmt_k(s.length):>7} {s.filler:<12} {s.value:<7} {s.needles:>7} {s.needles * VALUE_LEN[s.value] / lex_slots:>8.3f} "
              f"{f'{med:.1f} [{min(sc):.1f}, {max(sc):.1f}]':>20}  {SEED_CLAIM[s.filler]}")
    # The bar: the lane at 512k with 100 needles >= 99%; nexus above window-only past the window.
    lane_512 = [statistics.median(sc) for n, s, sc in rows if n == "lane" and s.length == 524288 and s.needles == 100]
    if lane_512:
        print(f"\nlexical lane at 512k, 100 needles: worst median {min(lane_512):.1f}% (target >= 99%)")
    by = {(n, s): statistics.median(sc) for n, s, sc in rows}
    pairs = [(s, by[("nexus", s)], by[("window_only", s)]) for (n, s) in by if n == "nexus" and ("window_only", s) in by]
    if pairs:
        beats = all(nx > wo for _, nx, wo in pairs)
        print(f"nexus beats window_only in {sum(nx > wo for _, nx, wo in pairs)}/{len(pairs)} settings"
              + ("" if beats else " (NOT all)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
