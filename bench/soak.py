"""Soak: the daemon under mixed load for N minutes, killed with SIGKILL and restarted every few.

A real ``agentd start`` (as in bench/daemon.py) serves ``--clients`` connections that chat, add and
search memories and send readings without pause; every ``--restart-every`` seconds it gets a
``kill -9`` and is started again, and the clients reconnect. A ``memory.add`` counts as acknowledged
only when its answer arrived. At the end the daemon is stopped cleanly and started once more, and:

- every acknowledged memory must be in ``memory.export`` with its text;
- the daemon's process count and open files must equal the baseline taken after the first start
  (the same warm-up before both), its RSS within 10% + 32 MiB of it, and no child process of any
  incarnation (sandbox fork servers and runs) may outlive it.

    .venv/bin/python bench/soak.py --minutes 15
    .venv/bin/python bench/soak.py --minutes 2 --restart-every 30
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
from harness import DaemonProc, bench_config, daemon_parser, exported_ids, process_tree

from agentd.client import Client, ConnectionLost, DaemonNotRunning, RequestError


class Soak:
    def __init__(self, d: DaemonProc, deadline: float) -> None:
        self.d = d
        self.deadline = deadline
        self.acked: dict[int, str] = {}
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.restarting = False
        self.children: set[tuple[int, float]] = set()  # (pid, start time) of every incarnation's children

    def note_children(self) -> None:
        assert self.d.proc is not None
        for c in psutil.Process(self.d.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                self.children.add((c.pid, c.create_time()))

    def leftovers(self) -> list[int]:
        """Children of any incarnation still alive (the same pid and start time)."""
        out = []
        for pid, started in self.children:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).create_time() == started:
                    out.append(pid)
        return out

    async def worker(self, cid: int) -> None:
        rng = random.Random(cid)
        n = 0
        while time.monotonic() < self.deadline:
            try:
                async with Client(self.d.socket_path, timeout=5) as c:
                    while time.monotonic() < self.deadline:
                        n += 1
                        op = rng.choice(("chat", "memory.add", "memory.add", "memory.search", "condition"))
                        if op == "chat":
                            await c.request("chat", timeout=120, text=f"worker {cid} turn {n}: what is {n} + {cid}?")
                        elif op == "memory.add":
                            text = f"soak worker {cid} memory {n}: gauge {rng.randint(0, 10**9)} read"
                            r = await c.request("memory.add", timeout=120, text=text)
                            self.acked[int(r["memory_id"])] = text
                        elif op == "memory.search":
                            await c.request("memory.search", timeout=120, query=f"gauge read by worker {cid}", k=3)
                        else:
                            await c.request("condition", timeout=120, values={"temperature": rng.uniform(0, 60)})
                        self.done[op] += 1
            except (TimeoutError, ConnectionLost, DaemonNotRunning, OSError):
                self.reconnects += 1  # the daemon was killed under us: expected, reconnect
                await asyncio.sleep(0.3)
            except RequestError as exc:
                if exc.code == "shutting_down" or self.restarting:
                    await asyncio.sleep(0.3)
                    continue
                self.errors[f"{exc.code}: {exc}"] += 1
                await asyncio.sleep(0.1)

    async def killer(self, every: float) -> int:
        kills = 0
        while time.monotonic() + every < self.deadline:
            await asyncio.sleep(every)
            self.restarting = True
            self.note_children()
            await asyncio.to_thread(self.d.kill9)
            kills += 1
            await asyncio.to_thread(self.d.start)
            self.restarting = False
            print(f"  kill -9 #{kills} and restart at {time.strftime('%H:%M:%S')}; acknowledged so far {len(self.acked)}",
                  flush=True)
        return kills


def warm(d: DaemonProc) -> dict[str, float]:
    """The same few requests before each measurement, then the daemon's footprint."""
    for i in range(3):
        d.request("chat", timeout=120, text=f"warm-up {i}")
        d.request("memory.search", query="warm-up", k=3)
    time.sleep(1.0)
    assert d.proc is not None
    return process_tree(d.proc.pid)


def main(argv: list[str] | None = None) -> int:
    p = daemon_parser(__doc__)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--restart-every", type=float, default=180.0, help="seconds between kill -9s (default: 180)")
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="agentd-soak-") as tmp:
        d = DaemonProc(Path(tmp), bench_config(args)).start()
        base = warm(d)
        print(f"soak: {args.minutes:g} min, {args.clients} clients, kill -9 every {args.restart_every:g} s; "
              f"baseline RSS {base['rss_mib']:.0f} MiB, {base['processes']} processes, {base['open_files']} open files", flush=True)
        soak = Soak(d, time.monotonic() + args.minutes * 60)

        async def run() -> int:
            killer = asyncio.create_task(soak.killer(args.restart_every))
            await asyncio.gather(*(soak.worker(i) for i in range(args.clients)))
            return await killer

        kills = asyncio.run(run())
        assert d.stop() == 0, "the final clean stop failed"
        d.start()
        final = warm(d)
        held = exported_ids(d, Path(tmp) / "export.jsonl")
        soak.note_children()
        d.stop()
        time.sleep(1.0)
        leftovers = soak.leftovers()

    lost = [i for i, text in soak.acked.items() if held.get(i) != text]
    print(f"requests: {sum(soak.done.values())} ({', '.join(f'{k} {v}' for k, v in sorted(soak.done.items()))}); "
          f"kills {kills}, client reconnects {soak.reconnects}")
    print(f"errors (other than the kills): {sum(soak.errors.values())} {dict(soak.errors) if soak.errors else ''}")
    print(f"acknowledged memories: {len(soak.acked)}, present after the run: {len(soak.acked) - len(lost)}, lost: {len(lost)}")
    print(f"footprint baseline -> end: RSS {base['rss_mib']:.0f} -> {final['rss_mib']:.0f} MiB, processes "
          f"{base['processes']} -> {final['processes']}, open files {base['open_files']} -> {final['open_files']}; "
          f"children outliving their daemon: {len(leftovers)} of {len(soak.children)}")
    clean = (not lost and not soak.errors and final["processes"] == base["processes"]
             and final["open_files"] == base["open_files"] and final["rss_mib"] <= base["rss_mib"] * 1.1 + 32
             and not leftovers)
    print(f"target: ends clean: {'met' if clean else 'NOT met'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
