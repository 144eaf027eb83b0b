"""Flat memory over a long stream: RSS and tokens/s while each backbone consumes ``--tokens`` tokens.

agentd runs for months on one stream, so a backbone's memory must not grow with the stream's
length. For each backbone (default: every built-in that is available, plus ``hf`` on the local
transformers model that ``--hf-model`` names; ``remote`` keeps its state on a server and is left
out), built with its default config, a child process
streams seeded random text through ``forward`` in ``--chunk``-token chunks with the state carried,
and samples its RSS and throughput every ``--every`` tokens (each sample is printed to stderr as it
is taken, the curve behind the summary). RSS is read after glibc's ``malloc_trim`` returns the heap's
free pages: the slack a forward's freed temporaries leave comes and goes by tens of MiB and is not
growth (the raw RSS's range is printed too). It prints the first sample after
warm-up (``--warmup`` of the stream), the last, the slope in MiB per million tokens, and whether the
last stays within 2% of the first (flat).

The named peer, measured in the same run: a transformers GPT-2 of the same parameter count decoding
the same stream with its KV cache, which is what a stateless LM must carry to remember. It can
only go as far as its position table (``--peer-positions``), and its RSS and tokens/s are printed
at that point, next to each backbone's at the same count.

    .venv/bin/python bench/stream.py                         # 10M tokens per backbone
    .venv/bin/python bench/stream.py --tokens 1000000 --archs hyena nexus
    .venv/bin/python bench/stream.py --archs hf --hf-model /path/to/a/local/gpt2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

import models

BUILTIN = ("hyena", "nexus", "agiformer", "spiral", "astarte")
FLAT_TOLERANCE = 0.02


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def rss_mib() -> tuple[float, float]:
    """(RSS after glibc returns its free heap pages, raw RSS) in MiB. The allocator keeps a forward's
    freed temporaries as slack that comes and goes by tens of MiB between samples (agiformer's raw
    RSS swings 310-380 MiB at 4k-token chunks); that is not growth, so flatness is judged on the
    trimmed figure, and the raw range is printed beside it. Without glibc both are the raw RSS."""
    raw = psutil.Process().memory_info().rss / (1 << 20)
    if _TRIM is None:
        return raw, raw
    _TRIM(0)
    return psutil.Process().memory_info().rss / (1 << 20), raw


def _build(name: str, hf_model: str | None) -> models.Backbone:
    if name == "hf":
        if not hf_model:
            raise SystemExit("stream.py: the hf backbone needs --hf-model DIR (a local transformers model directory)")
        return models.build("hf", path=hf_model)
    return models.build(name)


def stream_one(name: str, tokens: int, chunk: int, every: int, threads: int, seed: int,
               hf_model: str | None = None) -> list[dict[str, float]]:
    """Stream ``tokens`` through backbone ``name`` in this process; one sample per ``every`` tokens."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    bb = _build(name, hf_model)
    gen = torch.Generator().manual_seed(seed)
    state = bb.init_state(1)
    samples: list[dict[str, float]] = []
    done, last_t, last_n = 0, time.perf_counter(), 0
    with torch.inference_mode():
        while done < tokens:
            n = min(chunk, tokens - done)
            # Printable bytes: text-like input, no control tokens (those would be a protocol error).
            x = torch.randint(32, 127, (1, n), generator=gen)
            _, state = bb.forward(x, state)
            done += n
            if done - last_n >= every or done == tokens:
                now = time.perf_counter()
                rss, raw = rss_mib()
                samples.append({"tokens": done, "rss_mib": rss, "raw_mib": raw, "tok_s": (done - last_n) / (now - last_t),
                                "state_bytes": state.nbytes()})
                last_t, last_n = now, done
                # Every sample, as it is taken: the progress line, and the curve behind the summary.
                print(f"  {name}: {done:>11,} tokens  RSS {rss:7.1f} MiB (raw {raw:7.1f})  "
                      f"{samples[-1]['tok_s']:7.0f} tok/s", file=sys.stderr, flush=True)
    return samples


def stream_peer(params: int, d_model: int, positions: int, threads: int, seed: int) -> dict[str, float]:
    """GPT-2 of ``params`` parameters decoding ``positions`` tokens with its KV cache."""
    from backbones import _gpt2_step, gpt2_for  # bench/backbones.py: the same GPT-2 sizing everywhere

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = gpt2_for(params, d_model, positions, models.tokenizer.VOCAB_SIZE)
    gen = torch.Generator().manual_seed(seed)
    cache = None
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(positions):
            cache = _gpt2_step(model, torch.randint(32, 127, (1, 1), generator=gen), cache)
    return {"tokens": positions, "rss_mib": rss_mib()[0], "tok_s": positions / (time.perf_counter() - t)}


def _child(argv: list[str]) -> int:
    """``--child NAME|peer:PARAMS:D_MODEL`` runs one measurement and prints it as JSON."""
    args = parse(argv)
    if args.child.startswith("peer:"):
        _, params, d_model = args.child.split(":")
        out: object = stream_peer(int(params), int(d_model), args.peer_positions, args.threads, args.seed)
    else:
        out = stream_one(args.child, args.tokens, args.chunk, args.every, args.threads, args.seed, args.hf_model)
    print(json.dumps(out))
    return 0


def _run_child(child: str, argv: list[str]) -> object:
    """A fresh process per measurement, so one backbone's allocations never show in another's RSS."""
    # stderr is passed through: the child's samples are the progress, and its traceback the error.
    r = subprocess.run([sys.executable, __file__, *argv, "--child", child], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    if r.returncode != 0:
        raise RuntimeError(f"{child}: exit {r.returncode} (its error is printed above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _width(bb: models.Backbone) -> int:
    """The model width the GPT-2 peer is sized to (an hf model's own config names it)."""
    cfg = bb.config
    if hasattr(cfg, "d_model"):
        return int(cfg.d_model)
    hf = bb.model.config  # type: ignore[attr-defined]
    return int(getattr(hf, "hidden_size", None) or hf.n_embd)


def summarise(samples: list[dict[str, float]], warmup: float) -> dict[str, float]:
    """First sample after warm-up, last sample, slope (MiB per 1M tokens, least squares), flatness (all
    on the trimmed RSS), median tok/s, and the raw RSS's range over the kept samples."""
    total = samples[-1]["tokens"]
    kept = [s for s in samples if s["tokens"] > warmup * total] or samples[-1:]
    xs = [s["tokens"] / 1e6 for s in kept]
    ys = [s["rss_mib"] for s in kept]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    first, last = kept[0]["rss_mib"], kept[-1]["rss_mib"]
    rates = sorted(s["tok_s"] for s in kept)
    raw = [s["raw_mib"] for s in kept]
    return {"first": first, "last": last, "slope": slope, "flat": abs(last - first) <= FLAT_TOLERANCE * first,
            "tok_s": rates[len(rates) // 2], "state_bytes": kept[-1]["state_bytes"], "raw_min": min(raw), "raw_max": max(raw)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--archs", nargs="+", default=None,
                   help="backbones to stream (default: every available built-in, and hf with --hf-model)")
    p.add_argument("--hf-model", metavar="DIR", help="a local transformers causal LM for the hf backbone")
    p.add_argument("--tokens", type=int, default=10_000_000, help="tokens streamed per backbone (default: 10M)")
    p.add_argument("--chunk", type=int, default=2048, help="tokens per forward call (default: 2048)")
    p.add_argument("--every", type=int, default=100_000, help="tokens between samples (default: 100k)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the stream before the first kept sample")
    p.add_argument("--peer-positions", type=int, default=1024, help="tokens the GPT-2 peer decodes (its table size)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.archs is None:
        args.archs = [a for a in BUILTIN if a in models.available()] + (["hf"] if args.hf_model else [])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child:
        return _child(argv)
    print(f"streaming {args.tokens:,} tokens per backbone, chunks of {args.chunk}, {args.threads} threads; "
          f"flat = last RSS within {FLAT_TOLERANCE:.0%} of the first after {args.warmup:.0%} warm-up")
    print(f"{'backbone':<10} {'params':>8} {'state KiB':>9} {'RSS first':>10} {'RSS last':>9} {'MiB/Mtok':>9} "
          f"{'tok/s':>8}  flat   {'raw RSS range':>15} {'peer tok/s':>10} {'peer RSS':>9}")
    all_flat = True
    for name in args.archs:
        bb = _build(name, args.hf_model)
        params, d_model = models.count_parameters(bb), _width(bb)
        del bb
        samples = _run_child(name, argv)
        s = summarise(samples, args.warmup)  # type: ignore[arg-type]
        peer = _run_child(f"peer:{params}:{d_model}", argv)
        all_flat &= bool(s["flat"])
        print(f"{name:<10} {params / 1e6:7.2f}M {s['state_bytes'] / 1024:9.1f} {s['first']:9.1f}M {s['last']:8.1f}M "
              f"{s['slope']:9.3f} {s['tok_s']:8.0f}  {'yes' if s['flat'] else 'NO ':<5}  "
              f"{s['raw_min']:6.1f}-{s['raw_max']:6.1f}M "
              f"{peer['tok_s']:10.0f} {peer['rss_mib']:8.1f}M")  # type: ignore[index]
    print(f"target: RSS flat over the stream for every backbone: {'met' if all_flat else 'NOT met'}")
    return 0 if all_flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
