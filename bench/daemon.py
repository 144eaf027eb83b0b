"""The daemon under load: concurrent socket clients chatting, adding and searching memory while
sensor readings stream in.

A real ``agentd start`` (default backbone and its shipped weights when present, memory and sandbox
on, a quick breath) in a temporary directory. ``--clients`` connections each send ``--requests``
requests in a fixed mix (chat, memory.add, memory.search, condition), all in flight together, while
one more connection streams ``condition`` readings at ``--readings-per-s``. Printed:

- requests/s over the whole run, by op, and errors (any ``error`` event or lost connection);
- time to first SPEAK (request sent -> first ``speak`` event of that request) p50/p99, and the chat
  round trip (-> ``done``) p50/p99, next to a lone client's round trip in the same run, the peer:
  the ratio says what the load costs a user;
- events the daemon dropped for slow clients (``status.dropped_events``);
- acknowledged memories lost: every ``memory.add`` that was answered must be in ``memory.export``;
- the daemon's RSS, process count and open files before and after;
- over ``--repeats`` runs (each a fresh daemon, its own seed), the median and [min, max] of each.

    .venv/bin/python bench/daemon.py                     # 3 runs of 32 clients x 40 requests
    .venv/bin/python bench/daemon.py --clients 8 --requests 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import DaemonProc, bench_config, daemon_parser, exported_ids, percentile, process_tree

from agentd.client import Client, ConnectionLost, RequestError

MIX = ("chat", "memory.add", "memory.add", "memory.search", "memory.search", "condition")


class Load:
    def __init__(self) -> None:
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_speak: list[float] = []
        self.chat_rtt: list[float] = []
        self.silent_chats = 0
        self.acked: dict[int, str] = {}

    async def one(self, c: Client, op: str, rng: random.Random, cid: int, n: int) -> None:
        t0 = time.perf_counter()
        try:
            if op == "chat":
                first = None
                async for ev in c.stream("chat", text=f"client {cid} asks question {n}: what is {rng.randint(2, 99)} + {rng.randint(2, 99)}?"):
                    if ev.get("event") == "speak" and first is None:
                        first = time.perf_counter() - t0
                if first is None:
                    self.silent_chats += 1
                else:
                    self.first_speak.append(first)
                self.chat_rtt.append(time.perf_counter() - t0)
            elif op == "memory.add":
                text = f"client {cid} note {n}: the {rng.choice(['red', 'blue', 'green'])} valve {rng.randint(0, 10**9)} was checked"
                r = await c.request("memory.add", text=text, meta={"client": cid, "n": n})
                self.acked[int(r["memory_id"])] = text
            elif op == "memory.search":
                await c.request("memory.search", query=f"valve checked by client {rng.randint(0, 31)}", k=5)
            else:
                await c.request("condition", values={"temperature": rng.uniform(5, 50)})
            self.done[op] += 1
        except (RequestError, ConnectionLost, OSError) as exc:
            self.errors[f"{op}: {type(exc).__name__}: {getattr(exc, 'code', '')}"] += 1

    async def client(self, sock: Path, cid: int, requests: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        ops = [MIX[(cid + i) % len(MIX)] for i in range(requests)]
        async with Client(sock, timeout=30) as c:
            await asyncio.gather(*(self.one(c, op, rng, cid, n) for n, op in enumerate(ops)))


async def readings(sock: Path, per_s: float, stop: asyncio.Event, load: Load) -> None:
    rng = random.Random(7)
    async with Client(sock) as c:
        while not stop.is_set():
            try:
                await c.request("condition", values={"voltage": rng.uniform(10.5, 13.5)})
                load.done["readings"] += 1
            except (RequestError, ConnectionLost) as exc:
                load.errors[f"readings: {type(exc).__name__}"] += 1
            await asyncio.sleep(1 / per_s)


async def lone_chats(sock: Path, n: int) -> list[float]:
    out = []
    async with Client(sock) as c:
        for i in range(n):
            t = time.perf_counter()
            await c.request("chat", text=f"a lone question {i}: what is 3 + {i}?")
            out.append(time.perf_counter() - t)
    return out


def run_once(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One measurement on a fresh daemon; prints its figures and returns them."""
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        d = DaemonProc(Path(tmp), bench_config(args)).start()
        try:
            assert d.proc is not None
            lone = asyncio.run(lone_chats(d.socket_path, args.lone))
            before = process_tree(d.proc.pid)
            load = Load()

            async def run() -> float:
                stop = asyncio.Event()
                feeder = asyncio.create_task(readings(d.socket_path, args.readings_per_s, stop, load))
                t = time.perf_counter()
                await asyncio.gather(*(load.client(d.socket_path, i, args.requests, seed) for i in range(args.clients)))
                elapsed = time.perf_counter() - t
                stop.set()
                await feeder
                return elapsed

            elapsed = asyncio.run(run())
            after = process_tree(d.proc.pid)
            st = d.request("status")
            held = exported_ids(d, Path(tmp) / "export.jsonl")
            lost = [i for i, text in load.acked.items() if held.get(i) != text]
        finally:
            d.stop()

    total = sum(load.done.values())
    print(f"daemon: backbone {args.backbone} ({st.get('weights')}), {args.clients} clients x {args.requests} requests, "
          f"readings at {args.readings_per_s:g}/s, seed {seed}")
    print(f"requests: {total} in {elapsed:.1f} s = {total / elapsed:.1f} req/s  ({', '.join(f'{k} {v}' for k, v in sorted(load.done.items()))})")
    print(f"errors: {sum(load.errors.values())}  {dict(load.errors) if load.errors else ''}")
    print(f"time to first SPEAK: p50 {percentile(load.first_speak, 0.5) * 1000:.0f} ms  p99 {percentile(load.first_speak, 0.99) * 1000:.0f} ms"
          f"  ({len(load.first_speak)} chats spoke, {load.silent_chats} stayed silent)")
    lone_p50 = percentile(lone, 0.5)
    print(f"chat round trip: p50 {percentile(load.chat_rtt, 0.5) * 1000:.0f} ms  p99 {percentile(load.chat_rtt, 0.99) * 1000:.0f} ms;"
          f" lone client p50 {lone_p50 * 1000:.0f} ms (ratio {percentile(load.chat_rtt, 0.5) / lone_p50:.1f}x)")
    print(f"dropped events: {st['dropped_events']}   turns: {st['turns']}")
    print(f"acknowledged memories: {len(load.acked)}, lost: {len(lost)}")
    print(f"daemon RSS {before['rss_mib']:.0f} -> {after['rss_mib']:.0f} MiB (with children {before['tree_rss_mib']:.0f} -> "
          f"{after['tree_rss_mib']:.0f}); processes {before['processes']} -> {after['processes']}; "
          f"open files {before['open_files']} -> {after['open_files']}", flush=True)
    return {"req/s": total / elapsed, "errors": sum(load.errors.values()),
            "first SPEAK p50 ms": percentile(load.first_speak, 0.5) * 1000,
            "first SPEAK p99 ms": percentile(load.first_speak, 0.99) * 1000,
            "dropped events": st["dropped_events"], "acked memories": len(load.acked), "lost": len(lost),
            "RSS after MiB": after["rss_mib"]}


def main(argv: list[str] | None = None) -> int:
    p = daemon_parser(__doc__)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=40, help="requests per client (default: 40)")
    p.add_argument("--readings-per-s", type=float, default=50.0)
    p.add_argument("--lone", type=int, default=10, help="chats of the lone-client peer (default: 10)")
    p.add_argument("--repeats", type=int, default=3, help="runs, each on a fresh daemon with its own seed (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="the first run's seed (default: 0)")
    args = p.parse_args(argv)

    runs = []
    for i in range(args.repeats):
        runs.append(run_once(args, args.seed + i))
        print()
    print(f"over {len(runs)} runs: median [min, max]")
    for key in runs[0]:
        xs = sorted(r[key] for r in runs)
        print(f"  {key:<20} {statistics.median(xs):10.1f}  [{xs[0]:.1f}, {xs[-1]:.1f}]")
    ok = all(r["errors"] == 0 and r["lost"] == 0 and r["dropped events"] == 0 for r in runs)
    print(f"target: zero errors, zero lost acknowledged memories, zero dropped events: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
