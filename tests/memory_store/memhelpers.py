"""Helpers shared by the memory_store tests (imported as a plain module: pytest puts this
directory on sys.path)."""

from __future__ import annotations

import hashlib

import numpy as np


class HashEmbedder:
    """A second, deterministic embedding "model" (bag of hashed words) with another name and
    dimension, to prove that switching models re-indexes. Equal texts give equal vectors."""

    name = "test/hash-bag-of-words"
    dim = 64

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % self.dim] += 1.0
            out[i] /= max(float(np.linalg.norm(out[i])), 1e-6)
        return out


def distinct_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, natural-ish sentences (up to 13,200): random subject, verb, object and place."""
    rng = np.random.default_rng(seed)
    subjects = ["the gardener", "a pilot", "my sister", "the old radio", "a robot", "the baker", "our neighbour",
                "the river", "a violinist", "the night train", "the server rack", "a heron"]
    verbs = ["repaired", "painted", "forgot", "measured", "sold", "photographed", "described", "buried", "borrowed", "cooked"]
    objects = ["a blue bicycle", "the lighthouse key", "forty lemons", "an antique clock", "the voltage meter",
               "a jar of honey", "the winter tyres", "a chess set", "the attic window", "seven maps", "the garden hose"]
    places = ["in Lisbon", "near the harbour", "before dawn", "on Tuesday", "at the market", "under the bridge",
              "in the lab", "after the storm", "during lunch", "on the roof"]
    combos = [(a, b, c, d) for a in subjects for b in verbs for c in objects for d in places]
    picks = rng.permutation(len(combos))[:n]
    assert len(picks) == n, "not enough combinations"
    return [" ".join(combos[i]) for i in picks]
