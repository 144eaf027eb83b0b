"""MQTT ingest end to end: readings published at QoS 1 until a real daemon's ``status`` shows the last one.

Starts a mosquitto on a free loopback port and ``agentd start`` (tiny random hyena, memory and
sandbox off) subscribed to it, then publishes ``-n`` readings, one bare number per message on
``bench/conditions/r<k>`` (the costliest shape: one message per reading), or ``--batch`` readings
per JSON object. Time runs from the first publish until ``status`` shows every reading accepted
(``mqtt.readings``) and Soma holding the last value of each name. Prints readings/s and the loss
(published minus accepted), against the target: 5,000 readings/s with no loss.
``python bench/mqtt.py [-n N] [--batch B] [--rate R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from agentd.client import Client

TARGET = 5000.0
NAMES = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(root: Path, port: int) -> subprocess.Popen[bytes]:
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def start_daemon(root: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    cfg = root / "agentd.toml"
    cfg.write_text(
        f'[daemon]\ndata_dir = "{root / "data"}"\nrun_dir = "{root / "run"}"\nlog_format = "json"\nlog_level = "warning"\n'
        "torch_threads = 1\n"
        '[backbone]\nname = "hyena"\nmax_tokens = 8\n[backbone.options]\nd_model = 32\nn_layers = 2\nfilter_len = 16\nwindow = 16\n'
        "[memory]\nenabled = false\n[sandbox]\nenabled = false\n"
        f'[mqtt]\nenabled = true\nport = {port}\ntopic_prefix = "bench"\n'
    )
    agentd = str(Path(sys.executable).parent / "agentd")
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen([agentd, "--config", str(cfg), "start"], stdout=log, stderr=subprocess.STDOUT)
    return proc, root / "run" / "agentd.sock"


async def status(sock: Path) -> dict[str, Any]:
    async with Client(sock) as c:
        return await c.request("status", timeout=30)


async def wait_up(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agentd exited with {proc.returncode}")
        try:
            if (await status(sock))["mqtt"]["link"] == "up":
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("agentd did not connect to the broker")


async def publish(port: int, n: int, batch: int, rate: float) -> tuple[float, dict[str, float]]:
    """Publish ``n`` readings; the seconds it took and the last value of each name."""
    last: dict[str, float] = {}
    window = 200  # QoS 1 messages awaiting PUBACK at once
    async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=window) as mq:
        mq.pending_calls_threshold = window + 1  # a full window is the plan here, not a warning
        t0 = time.perf_counter()
        pending: list[asyncio.Future[None]] = []
        sent = 0
        while sent < n:
            if batch == 1:
                name, value = f"r{sent % NAMES}", float(sent)
                last[name] = value
                coro = mq.publish(f"bench/conditions/{name}", repr(value).encode(), qos=1)
                sent += 1
            else:
                obj = {f"r{(sent + i) % NAMES}": float(sent + i) for i in range(min(batch, n - sent))}
                last.update(obj)
                coro = mq.publish("bench/conditions", json.dumps(obj).encode(), qos=1)
                sent += len(obj)
            pending.append(asyncio.ensure_future(coro))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
            if rate and sent / rate > time.perf_counter() - t0:
                await asyncio.sleep(sent / rate - (time.perf_counter() - t0))
        await asyncio.gather(*pending)
    return time.perf_counter() - t0, last


async def run(args: argparse.Namespace, port: int, sock: Path) -> int:
    before = (await status(sock))["mqtt"]
    t0 = time.perf_counter()
    pub_s, last = await publish(port, args.n, args.batch, args.rate)
    want = before["readings"] + args.n
    st: dict[str, Any] = {}
    prev, still_since = -1, time.monotonic()
    while True:
        st = await status(sock)
        now = time.perf_counter()
        readings = st["mqtt"]["readings"]
        if readings >= want and all(st["soma"]["values"].get(k) == v for k, v in last.items()):
            break
        if readings != prev:
            prev, still_since = readings, time.monotonic()
        elif time.monotonic() - still_since > 5:  # nothing arrived for 5 s: the rest is lost
            now = still_since
            break
        await asyncio.sleep(0.005)
    e2e = now - t0
    m = st["mqtt"]
    got = m["readings"] - before["readings"]
    lost = args.n - got
    rps = got / e2e
    shape = "bare number per message" if args.batch == 1 else f"JSON objects of {args.batch}"
    print(f"readings: {args.n} ({shape}), paced at {args.rate or 'max'} /s; published in {pub_s:.2f} s")
    print(f"end to end (first publish -> status shows the last value): {e2e:.2f} s")
    print(f"ingested: {got} readings, {rps:,.0f} readings/s; lost {lost}; bad payloads {m['bad_total']}; "
          f"incoming queue drops {m['incoming_dropped']}")
    ok = lost == 0 and rps >= TARGET
    print(f"target {TARGET:,.0f} readings/s with no loss: {'met' if ok else 'NOT met'} ({rps / TARGET:.2f}x)")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50000, help="readings to publish (default 50000)")
    ap.add_argument("--batch", type=int, default=1, help="readings per message: 1 = bare numbers (default)")
    ap.add_argument("--rate", type=float, default=0.0, help="readings/s to pace the publisher at (0 = as fast as it goes)")
    args = ap.parse_args()
    if not shutil.which("mosquitto"):
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-mqtt-"))
    port = free_port()
    broker = start_broker(root, port)
    daemon, sock = start_daemon(root, port)
    try:
        asyncio.run(wait_up(sock, daemon))
        return asyncio.run(run(args, port, sock))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        broker.kill()
        broker.wait(5)
        shutil.rmtree(root, ignore_errors=True) if os.environ.get("KEEP") is None else print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())
