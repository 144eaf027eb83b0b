"""Memory with the real daemon (``agentd start`` as a subprocess) over its real socket: acknowledged
memories survive ``kill -9``; ``stop``/``start`` resumes the neural state bit for bit and generates
what an uninterrupted daemon generates; a garbage index and a truncated snapshot recover with a
warning."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agentd.client import Client

pytestmark = pytest.mark.slow
AGENTD = [sys.executable, "-m", "agentd.cli"] if not (Path(sys.executable).parent / "agentd").exists() else [
    str(Path(sys.executable).parent / "agentd")]


class Agentd:
    """One daemon process on a given data directory; started again as often as a test needs."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.config = root / f"{name}.toml"
        self.config.write_text(
            f'[daemon]\ndata_dir = "{root / name}"\nrun_dir = "{root / (name + "-run")}"\nlog_format = "json"\n'
            '[breath]\ninhale_s = 0.0\nhold_s = 0.0\npause_s = 0.2\n'
            '[backbone]\nname = "hyena"\nmax_tokens = 24\ntemperature = 0.9\n'
            '[sandbox]\nenabled = false\n'
        )
        self.socket = root / (name + "-run") / "agentd.sock"
        self.data = root / name
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.root / f"{self.config.stem}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([*AGENTD, "--config", str(self.config), "start"], stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "AGENTD_CONFIG": ""})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                self.request("status")
                return
            except Exception:
                time.sleep(0.2)
        raise AssertionError(f"daemon did not start: {log.read_text()}")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            async with Client(self.socket) as c:
                return await c.request(op, timeout=60, **fields)

        return asyncio.run(go())

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def events(self, index: int = -1) -> list[dict[str, Any]]:
        out = []
        for line in self.logs[index].read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a library's own stderr line
        return out

    def warnings(self, event: str, index: int = -1) -> list[dict[str, Any]]:
        return [e for e in self.events(index) if e.get("event") == event and e.get("level") == "warning"]


@pytest.fixture
def daemons(tmp_path: Path) -> Any:
    made: list[Agentd] = []

    def make(name: str) -> Agentd:
        d = Agentd(tmp_path, name)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()


def distinct_texts(n: int, seed: int = 0) -> list[str]:
    subj = ["the gardener", "a pilot", "my sister", "the old radio", "a robot", "the baker", "our neighbour", "the river",
            "a violinist", "the night train", "the server rack", "a heron", "the mayor", "a courier"]
    verb = ["repaired", "painted", "forgot", "measured", "sold", "photographed", "described", "buried", "borrowed", "cooked"]
    obj = ["a blue bicycle", "the lighthouse key", "forty lemons", "an antique clock", "the voltage meter", "a jar of honey",
           "the winter tyres", "a chess set", "the attic window", "seven maps", "the garden hose", "a brass compass"]
    place = ["in Lisbon", "near the harbour", "before dawn", "on Tuesday", "at the market", "under the bridge",
             "in the lab", "after the storm", "during lunch", "on the roof", "in Oslo", "by the lake"]
    return random.Random(seed).sample([f"{a} {b} {c} {d}" for a in subj for b in verb for c in obj for d in place], n)


async def pipelined_adds(sock: Path, texts: list[str], connections: int = 4) -> list[int]:
    """memory.add for every text, all in flight at once over a few connections; the memory ids."""

    async def part(chunk: list[str]) -> list[int]:
        async with Client(sock) as c:
            res = await asyncio.gather(*(c.request("memory.add", timeout=120, text=t, meta={"n": i}) for i, t in chunk))
            return [r["memory_id"] for r in res]

    indexed = list(enumerate(texts))
    parts = await asyncio.gather(*(part(indexed[i::connections]) for i in range(connections)))
    ids = [0] * len(texts)
    for i in range(connections):
        for (n, _), mid in zip(indexed[i::connections], parts[i], strict=True):
            ids[n] = mid
    return ids


def test_acknowledged_memories_survive_kill9_and_a_garbage_index(daemons: Any) -> None:
    d = daemons("a")
    d.start()
    texts = distinct_texts(1000, seed=1)
    ids = asyncio.run(pipelined_adds(d.socket, texts))
    assert len(set(ids)) == 1000  # every add acknowledged, each with its own id
    d.kill9()
    (d.data / "memory" / "index.faiss").write_bytes(os.urandom(4096))
    d.start()
    assert d.warnings("memory.index_rebuild"), "a garbage index must be rebuilt with a warning"
    stats = d.request("memory.stats")
    assert stats["memories"] == 1000 and stats["index_ntotal"] == 1000
    for n in random.Random(2).sample(range(1000), 25):
        (top, *_) = d.request("memory.search", query=texts[n], k=3)["results"]
        assert top["memory_id"] == ids[n] and top["text"] == texts[n], n
    d.stop()


def _speech(d: Agentd, text: str) -> tuple[Any, str]:
    res = d.request("chat", text=text)
    return res.get("speak"), d.request("status")["state_digest"]


def test_stop_start_resumes_bit_for_bit_and_a_truncated_snapshot_falls_back(daemons: Any) -> None:
    d, ref = daemons("b"), daemons("c")
    d.start()
    _speech(d, "hello there, how are you?")
    digest1 = d.request("status")["state_digest"]
    d.stop()
    d.start()
    assert d.request("status")["state_digest"] == digest1  # stop/start: the same neural state
    speak2, digest2 = _speech(d, "tell me about the weather")
    d.stop()

    ref.start()  # the same conversation without the restart
    _speech(ref, "hello there, how are you?")
    ref_speak2, ref_digest2 = _speech(ref, "tell me about the weather")
    ref.stop()
    assert (speak2, digest2) == (ref_speak2, ref_digest2)

    snaps = sorted((d.data / "snapshots").glob("state-*.safetensors"))
    assert len(snaps) >= 2
    snaps[-1].write_bytes(snaps[-1].read_bytes()[:-64])  # the shutdown snapshot, truncated
    d.start()
    (w,) = d.warnings("memory.snapshot_skipped")
    assert w["path"] == str(snaps[-1])
    # The snapshot before it (the PAUSE after the last turn) holds the same state.
    assert d.request("status")["state_digest"] == digest2
    d.stop()
