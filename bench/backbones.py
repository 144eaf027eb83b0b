"""Throughput of agentd's backbones against a transformers GPT-2 of the same size.

For each backbone (default: every one of hyena / nexus / agiformer / spiral / astarte that is
available), built with its default config, and for a randomly initialised ``GPT2LMHeadModel`` sized
to that backbone's parameter count (±10%, its position table excluded: a lookup, not compute), prints:

* prefill tokens/s at each ``--lengths`` (one ``forward`` over the whole prompt from a fresh state;
  GPT-2 runs its causal SDPA attention over the whole prompt, without a cache), and
* decode tokens/s: ``--decode`` single-token steps after a ``--context``-token prefill (GPT-2
  decodes with its KV cache),

then each backbone's ratio to its GPT-2. Targets checked: hyena prefill at 16k tokens >= 3x GPT-2,
and every backbone's decode >= GPT-2's. Weights are random: speed does not depend on them. Figures
on a shared machine are noisy: ``--repeat`` keeps the best of several runs.

    .venv/bin/python bench/backbones.py                        # everything, 2 threads
    .venv/bin/python bench/backbones.py --archs hyena --lengths 1024 4096 --decode 128
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import models

ARCHS = ("hyena", "nexus", "agiformer", "spiral", "astarte")
TARGET_LENGTH = 16384  # hyena's prefill target (>= 3x GPT-2) is stated at this length


@dataclass
class Result:
    name: str
    params: int
    prefill: dict[int, float] = field(default_factory=dict)  # length -> tokens/s
    decode: float = 0.0  # tokens/s


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench_backbone(bb: models.Backbone, lengths: list[int], context: int, n_decode: int, repeat: int) -> Result:
    dev = bb.device
    res = Result(bb.name, models.count_parameters(bb))
    with torch.inference_mode():
        bb.forward(torch.randint(0, 256, (1, 64), device=dev), bb.init_state(1))  # warm-up (filter caches, allocator)
        for n in lengths:
            tokens = torch.randint(0, 256, (1, n), device=dev)
            res.prefill[n] = n / _timed(lambda tokens=tokens: bb.forward(tokens, bb.init_state(1)), repeat)
        _, state = bb.forward(torch.randint(0, 256, (1, context), device=dev), bb.init_state(1))
        steps = torch.randint(0, 256, (n_decode,), device=dev)

        def decode() -> None:
            s = state
            for i in range(n_decode):
                _, s = bb.step(steps[i : i + 1], s)

        res.decode = n_decode / _timed(decode, repeat)
    return res


def gpt2_for(params: int, d_model: int, n_positions: int, vocab: int) -> torch.nn.Module:
    """A random GPT2LMHeadModel whose parameter count (position table excluded) is closest to
    ``params``, preferring a width near ``d_model``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def count(d: int, n: int) -> int:  # embeddings (tied head) + n blocks + final norm
        return vocab * d + n * (12 * d * d + 13 * d) + 2 * d

    widths = [d_model] + [d for d in range(64, 1025, 64) if d != d_model]
    shapes = [(d, n) for d in widths for n in range(1, 49)]
    # The backbone's own width when some depth lands within 10%; otherwise the closest count.
    near = [s for s in shapes if s[0] == d_model and abs(count(*s) - params) <= 0.1 * params]
    d, n = min(near or shapes, key=lambda s: abs(count(*s) - params))
    heads = next(h for h in (d // 64, 4, 3, 2, 1) if h >= 1 and d % h == 0)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=d, n_layer=n, n_head=heads, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa",  # the fastest attention transformers has on CPU
    )
    model = GPT2LMHeadModel(cfg)
    return model.eval()


def _gpt2_step(model: torch.nn.Module, tokens: torch.Tensor, cache: object) -> object:
    """One forward with a KV cache; transformers 5 names it ``cache``, 4.x ``past_key_values``."""
    import inspect

    if "cache" in inspect.signature(model.forward).parameters:
        return model(tokens, cache=cache, use_cache=True).cache
    return model(tokens, past_key_values=cache, use_cache=True).past_key_values


def bench_gpt2(model: torch.nn.Module, lengths: list[int], context: int, n_decode: int, repeat: int) -> Result:
    cfg = model.config
    pos_params = cfg.n_positions * cfg.n_embd
    res = Result(f"gpt2 (d={cfg.n_embd}, L={cfg.n_layer})", models.count_parameters(model) - pos_params)
    with torch.inference_mode():
        model(torch.randint(0, 256, (1, 64)), use_cache=False)
        for n in lengths:
            tokens = torch.randint(0, 256, (1, n))
            res.prefill[n] = n / _timed(lambda tokens=tokens: model(tokens, use_cache=False), repeat)
        past = _gpt2_step(model, torch.randint(0, 256, (1, context)), None)
        steps = torch.randint(0, 256, (n_decode, 1, 1))

        def decode() -> None:
            p = copy.deepcopy(past)  # a fresh prefilled cache each run: transformers' caches grow in place
            for i in range(n_decode):
                p = _gpt2_step(model, steps[i], p)

        res.decode = n_decode / _timed(decode, repeat)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=None, help=f"backbones to run (default: the available ones of {', '.join(ARCHS)})")
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384], help="prefill lengths in tokens")
    ap.add_argument("--decode", type=int, default=256, help="decode steps to time")
    ap.add_argument("--context", type=int, default=1024, help="tokens prefilled before the decode is timed")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure; the best is kept")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2 baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    archs = args.archs or [a for a in ARCHS if a in models.available()]
    pairs: list[tuple[Result, Result | None]] = []
    baselines: dict[tuple[int, int], Result] = {}  # GPT-2 shape -> its figures, shared by equal sizes
    for name in archs:
        try:
            bb = models.build(name)
        except models.ModelError as exc:
            print(f"{name}: cannot build ({exc}); skipped")
            continue
        res = bench_backbone(bb, args.lengths, args.context, args.decode, args.repeat)
        _print(res, args.lengths)
        base = None
        if not args.no_gpt2:
            n_pos = max(args.lengths) + args.context + args.decode
            model = gpt2_for(res.params, bb.config.d_model, n_pos, bb.config.vocab_size)
            shape = (model.config.n_embd, model.config.n_layer)
            if shape not in baselines:
                baselines[shape] = bench_gpt2(model, args.lengths, args.context, args.decode, args.repeat)
                _print(baselines[shape], args.lengths)
            base = baselines[shape]
        pairs.append((res, base))
        del bb

    if not any(base for _, base in pairs):
        return 0
    print(f"\nratios vs the GPT-2 of each backbone's size ({args.threads} threads; GPT-2 params exclude its position table):")
    for r, g in pairs:
        if g is not None:
            pre = "  ".join(f"prefill@{n}={r.prefill[n] / g.prefill[n]:.2f}x" for n in args.lengths)
            print(f"  {r.name:10s} vs {g.name}: params {r.params / g.params:.2f}x  {pre}  decode={r.decode / g.decode:.2f}x")
    print("\ntargets:")
    for r, g in pairs:
        if g is None:
            continue
        if r.name == "hyena":
            if TARGET_LENGTH in r.prefill:
                ratio = r.prefill[TARGET_LENGTH] / g.prefill[TARGET_LENGTH]
                print(f"  hyena prefill@{TARGET_LENGTH} >= 3x gpt2: {ratio:.2f}x  {'MET' if ratio >= 3 else 'NOT MET'}")
            else:
                print(f"  hyena prefill@{TARGET_LENGTH} >= 3x gpt2: not measured (add {TARGET_LENGTH} to --lengths)")
        ratio = r.decode / g.decode
        print(f"  {r.name} decode >= gpt2 with KV cache: {ratio:.2f}x  {'MET' if ratio >= 1 else 'NOT MET'}")
    return 0


def _print(r: Result, lengths: list[int]) -> None:
    pre = "  ".join(f"prefill@{n}={r.prefill[n]:,.0f}" for n in lengths)
    print(f"{r.name:24s} {r.params / 1e6:6.2f}M params  {pre}  decode={r.decode:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
