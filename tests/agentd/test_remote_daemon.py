"""The ``remote`` backbone end to end: a real ``agentd start`` against a real ``transformers serve``.

The served model is built and saved by the test (tests/models/tinylm.py ``chain_llama``): a tiny
Llama with a byte-level tokenizer and a chat template whose reply is fixed by its weights, so what
the test asserts is the real pipeline and not luck: the chat request goes over the socket, agentd
builds the system prompt and messages, ``transformers serve`` streams the reply over
``/v1/chat/completions`` (the SPEAK tag split over two chunks), the tag parser turns it into streamed
``speak`` events. A random model could not be told to emit tags; this one emits them by construction.

Then the server is killed mid-turn (SIGKILL at the first SPEAK delta): the requester gets an
``error`` event, subscribers see the retries, ``status`` keeps answering and shows the endpoint
down. The server comes back and the next turn succeeds. A daemon restart resumes the transcript
(equal ``state_digest``) and the next request carries the earlier turns."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd import config as config_mod
from agentd.client import Client, RequestError
from agentd.config import ConfigError
from tests.conftest import AGENTD, DaemonProc, free_port, to_toml
from tests.models import tinylm

TRANSFORMERS = str(Path(sys.executable).parent / "transformers")
# The fixed reply: THINK, then SPEAK (its tag split over two tokens, so the server streams it in
# two chunks) with enough words that a kill at the first SPEAK delta lands mid-stream, then WAIT.
WORDS = tuple(f" w{i}" for i in range(24))
REPLY = ("<think>", "greet", " the", " user", "<sp", "eak>", "Hello", " from", " a", " tiny", " model:", *WORDS, "<wait/>")
SPOKEN = "Hello from a tiny model:" + "".join(WORDS)


class Serve:
    """``transformers serve MODEL`` on a loopback port; ``kill`` and ``start`` again keep the port."""

    def __init__(self, model: Path, root: Path) -> None:
        self.model, self.root, self.port = model, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}
        with open(self.root / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([TRANSFORMERS, "serve", str(self.model), "--host", "127.0.0.1", "--port",
                                          str(self.port), "--device", "cpu", "--log-level", "warning"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"transformers serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"transformers serve not ready in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    model = tinylm.chain_llama(tmp_path / "chain-llama", reply=REPLY)
    s = Serve(model, tmp_path)
    yield s
    s.kill()


def remote_daemon(daemon_factory: Callable[..., DaemonProc], serve: Serve, **options: Any) -> DaemonProc:
    return daemon_factory(start=False, backbone={"name": "remote", "max_tokens": 128, "temperature": 0.0, "options": {
        "base_url": serve.url + "/v1", "model": str(serve.model), "api_key_env": "", "connect_timeout_s": 2.0,
        "read_timeout_s": 60.0, "max_retries": 2, "backoff_s": 0.2, "backoff_max_s": 1.0, "window": 8192, **options}})


async def chat(d: DaemonProc, text: str, on_event: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with Client(d.socket_path, timeout=10) as c:
        async for ev in c.stream("chat", text=text):
            events.append(ev)
            if on_event is not None:
                on_event(ev)
    return events, events[-1]["result"]


def turn_ok(events: list[dict[str, Any]], result: dict[str, Any]) -> None:
    deltas = [ev["delta"] for ev in events if ev["event"] == "speak" and "delta" in ev]
    assert len(deltas) >= 5 and "".join(deltas) == SPOKEN, deltas  # streamed word by word, not at once
    assert [ev["text"] for ev in events if ev["event"] == "think" and ev.get("end")] == ["greet the user"]
    assert [ev["text"] for ev in events if ev["event"] == "speak" and ev.get("end")] == [SPOKEN]
    assert result["speak"] == SPOKEN and result["reason"] == "wait"


@pytest.mark.slow  # two `transformers serve` start-ups (~10 s each on an idle box, 25 s on a busy one)
def test_chat_against_transformers_serve_survives_a_server_kill_and_a_restart(
        daemon_factory: Callable[..., DaemonProc], serve: Serve) -> None:
    t0 = time.monotonic()
    serve.start()  # it loads while the daemon starts: agentd does not need its server to start
    d = remote_daemon(daemon_factory, serve)
    d.start()
    st = d.request("status")
    assert st["backbone"] == "remote" and st["remote"]["endpoint"] == serve.url + "/v1"
    assert st["remote"]["model"] == str(serve.model)
    serve.wait_ready()
    timings = {"startup_s": time.monotonic() - t0}

    # 1. A turn end to end, SPEAK streamed.
    t = time.monotonic()
    events, result = asyncio.run(chat(d, "hello"))
    timings["turn_s"] = time.monotonic() - t
    turn_ok(events, result)
    st = d.request("status")
    assert st["remote"]["health"] == "ok" and st["remote"]["first_byte_s"] is not None and st["turns"] == 1

    # 2. The server dies mid-turn: an error event for the requester, retries seen by subscribers,
    #    and the daemon keeps answering status.
    requester: list[dict[str, Any]] = []

    async def killed_turn() -> tuple[list[dict[str, Any]], RequestError, dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        async with Client(d.socket_path, timeout=10) as watcher:
            await watcher.request("subscribe")

            turn_over = asyncio.Event()

            async def watch() -> None:
                async for ev in watcher.events():
                    seen.append(ev)
                    if ev.get("event") == "wait":
                        turn_over.set()

            task = asyncio.create_task(watch())

            def kill_at_first_speak(ev: dict[str, Any]) -> None:
                requester.append(ev)
                if ev["event"] == "speak" and "delta" in ev:
                    serve.kill()

            with pytest.raises(RequestError) as err:
                await chat(d, "tell me more", kill_at_first_speak)
            async with Client(d.socket_path, timeout=10) as c:
                during = await c.request("status", timeout=10)
            await asyncio.wait_for(turn_over.wait(), 10)
            task.cancel()
        return seen, err.value, during

    t = time.monotonic()
    seen, err, during = asyncio.run(killed_turn())
    timings["error_after_kill_s"] = time.monotonic() - t
    assert err.code == "backbone_unavailable" and "failed 3 times" in err.message, err
    # The error is the request's one terminal event: it comes after the turn's wait, no done follows.
    assert requester[-1]["event"] == "wait" and requester[-1]["reason"] == "error"
    retries = [ev for ev in seen if ev.get("event") == "error" and ev.get("code") == "backbone_retry"]
    assert [ev["code"] for ev in seen if ev.get("event") == "error" and ev.get("fatal", True) is not False][-1:] == [
        "backbone_unavailable"]  # subscribers see the turn fail too
    assert len(retries) == 2 and all(ev["fatal"] is False and ev["endpoint"] == serve.url + "/v1" for ev in retries)
    partial = "".join(ev["delta"] for ev in seen if ev.get("event") == "speak" and "delta" in ev)
    assert partial and SPOKEN.startswith(partial) and partial != SPOKEN  # it was cut mid-reply
    assert during["state"] == "running" and during["remote"]["health"] == "down"
    assert "cannot connect" in during["remote"]["last_error"]

    # 3. The server comes back: the next turn succeeds.
    t = time.monotonic()
    timings["serve_restart_s"] = serve.start().wait_ready()
    events, result = asyncio.run(chat(d, "are you back?"))
    turn_ok(events, result)
    assert d.request("status")["remote"]["health"] == "ok"

    # 4. A daemon restart resumes the transcript: same digest, and the next request carries it.
    before = d.request("status")
    assert d.cli("stop").returncode == 0
    t = time.monotonic()
    d.start()
    timings["daemon_restart_s"] = time.monotonic() - t
    after = d.request("status")
    assert after["state_digest"] == before["state_digest"]
    assert after["position"] == before["position"] and after["turns"] == before["turns"] == 3
    turn_ok(*asyncio.run(chat(d, "still there?")))
    sent = [json.loads(line) for line in d.log().splitlines() if '"remote_request"' in line]
    # Turns sent: system, then user/assistant alternating: hello, reply, (tell me more + are you
    # back?), reply, still there? -> 6 messages, the earlier ones from the restored state.
    assert sent[-1]["turns_sent"] == 6, sent[-1]
    timings["total_s"] = time.monotonic() - t0
    print("remote e2e timings:", {k: round(v, 2) for k, v in timings.items()})


@pytest.mark.parametrize(("options", "key", "message"), [
    ({"base_url": "gpu-box:8000"}, "backbone.options.base_url", "http(s) URL"),
    ({"api_key": "sk-plain"}, "backbone.options.api_key", "must not be written in the config"),
    ({"api_key_file": "/nonexistent/remote.key"}, "backbone.options.api_key_file", "cannot read api_key_file"),
    ({"bse_url": "http://x/v1"}, "backbone.options.bse_url", "unknown config key(s) ['bse_url']"),
    ({"max_retries": -1}, "backbone.options.max_retries", ">= 0"),
])
def test_bad_remote_options_name_the_key(options: dict[str, Any], key: str, message: str) -> None:
    cfg = config_mod.from_dict({"backbone": {"name": "remote", "options": options}})
    with pytest.raises(ConfigError) as err:
        config_mod.check_backbone(cfg)
    assert err.value.key == key and message in str(err.value) and "sk-plain" not in str(err.value)


def test_bad_remote_options_stop_start_with_exit_2_before_anything_is_touched(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(to_toml({"daemon": {"run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data")},
                             "backbone": {"name": "remote", "options": {"api_key": "sk-plain"}}}))
    r = subprocess.run([AGENTD, "--config", str(path), "start"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "backbone.options.api_key" in r.stderr, (r.stdout, r.stderr)
    assert "sk-plain" not in r.stderr  # a key written in the config is refused, never echoed
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
