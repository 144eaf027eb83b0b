"""``agentd``: start the daemon, talk to it, and manage it.

Exit status: 0 success; 1 a runtime failure (no daemon running, a request refused); 2 a usage or
configuration error (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import importlib
import json
import os
import signal
import sys
import time
from typing import Any

from agentd import config as config_mod
from agentd.client import Client, ClientError, DaemonNotRunning, RequestError, request_sync
from agentd.config import Config, ConfigError

# Commands that live in their own modules: each has add_parser(subparsers) and run(args, config) -> int.
PLUGIN_MODULES = ("agentd.cli_memory", "agentd.cli_exec", "agentd.console", "agentd.cli_train")

DESCRIPTION = """agentd: a long-running agent daemon for small, stateful neural models.

Start it with `agentd start` (in the foreground, as systemd expects), then talk to it with
`agentd chat`, watch it with `agentd console`, and stop it with `agentd stop`."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    p = argparse.ArgumentParser(prog="agentd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help="config file (default: $AGENTD_CONFIG, else built-in defaults)")
    p.add_argument("--socket", metavar="PATH", help="talk to the daemon at this socket instead of the configured one")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("start", help="run the daemon in the foreground until SIGTERM/SIGINT",
                   description="Run the daemon in the foreground (systemd Type=notify). SIGTERM or SIGINT stops it "
                               "cleanly; SIGHUP reloads the log level and breath timings.")
    st = sub.add_parser("stop", help="stop a running daemon and wait until it has exited",
                        description="Send SIGTERM to the daemon that holds the lock in run_dir and wait for it to exit.")
    st.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    s = sub.add_parser("status", help="show the daemon's phase, backbone, turns and parts",
                       description="Ask the running daemon for its status.")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    c = sub.add_parser("chat", help="send a message and print the streamed reply (no message: a line REPL)",
                       description="Send MESSAGE and print the reply as it streams. Without MESSAGE, read lines "
                                   "from the terminal and send each one (Ctrl-D ends).")
    c.add_argument("message", nargs="?", help="the message; omit for an interactive REPL")
    c.add_argument("--thoughts", action="store_true", help="also print THINK segments (to stderr)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a reply (default 300)")
    cd = sub.add_parser("condition", help="send sensor readings to the daemon (as MQTT would)",
                        description="Feed readings to Soma through the socket op `condition`, the same path MQTT "
                                    "readings take, and print the felt state that results. Example: "
                                    "agentd condition voltage=10.2 temperature=31")
    cd.add_argument("readings", nargs="+", type=_reading, metavar="NAME=VALUE", help="a reading, e.g. latency=250")
    cfg = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    csub = cfg.add_subparsers(dest="config_cmd", required=True, metavar="{check,show}")
    csub.add_parser("check", help="validate the configuration without starting (exit 2 on an error)")
    csub.add_parser("show", help="print the effective configuration (file + environment) as JSON")
    plugins: dict[str, Any] = {}
    for name in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            if exc.name != name:  # the module exists but is broken: that is a bug worth seeing
                raise
            continue
        before = set(sub.choices)
        mod.add_parser(sub)
        for cmd in set(sub.choices) - before:
            plugins[cmd] = mod
    return p, plugins


def _reading(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def _load_config(args: argparse.Namespace) -> Config:
    cfg = config_mod.load(args.config)
    if args.socket:
        cfg = config_mod.replace(cfg, "socket", path=args.socket)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser, plugins = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _load_config(args)
        if args.command == "start" or (args.command == "config" and args.config_cmd == "check"):
            config_mod.check_backbone(cfg)
    except ConfigError as exc:
        print(f"agentd: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command in plugins:
            return int(plugins[args.command].run(args, cfg))
        return int(COMMANDS[args.command](args, cfg))
    except DaemonNotRunning as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 1
    except RequestError as exc:
        print(f"agentd: the daemon refused the request: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_start(args: argparse.Namespace, cfg: Config) -> int:
    from agentd import log as log_mod
    from agentd.daemon import Daemon

    log_mod.setup(cfg.daemon.log_level, cfg.daemon.log_format)
    return asyncio.run(Daemon(cfg).serve())


def _daemon_pid(cfg: Config) -> int | None:
    try:
        text = cfg.lock_path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock_held(cfg: Config) -> bool:
    try:
        fd = os.open(cfg.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def cmd_stop(args: argparse.Namespace, cfg: Config) -> int:
    pid = _daemon_pid(cfg)
    if pid is None or not _lock_held(cfg):
        print(f"agentd: agentd is not running (no pid in {cfg.lock_path})", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"agentd: agentd is not running (pid {pid} is gone)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _lock_held(cfg):  # released at the very end of shutdown (the pid may linger as a zombie)
            print(f"agentd stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    print(f"agentd: pid {pid} did not exit within {args.timeout:.0f}s", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    async def go() -> dict[str, Any]:
        async with Client(cfg.socket_path) as c:
            return await c.request("status", timeout=30)

    st = asyncio.run(go())
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"agentd {st.get('version')}  pid {st.get('pid')}  up {st.get('uptime_s', 0):.0f}s  state {st.get('state')}")
    print(f"  backbone   {st.get('backbone')} ({st.get('weights')})  position {st.get('position')}")
    print(f"  breath     {st.get('phase')} #{st.get('breath')}  turns {st.get('turns')}  inbox {st.get('inbox')}")
    print(f"  clients    {st.get('clients')}  requests {st.get('requests')}  errors {st.get('errors')}")
    print(f"  state      sha256 {str(st.get('state_digest'))[:16]}…")
    for name in ("remote", "memory", "sandbox", "soma", "mqtt"):
        if isinstance(st.get(name), dict):
            brief = ", ".join(f"{k}={v}" for k, v in st[name].items() if not isinstance(v, dict | list))
            print(f"  {name:<10} {brief}")
    return 0


def _print_event(ev: dict[str, Any], thoughts: bool) -> None:
    kind = ev.get("event")
    if kind == "speak" and "delta" in ev:
        sys.stdout.write(ev["delta"])
        sys.stdout.flush()
    elif kind == "think" and "delta" in ev and thoughts:
        sys.stderr.write(ev["delta"])
    elif kind == "exec" and "code" in ev:
        print(f"\n[exec]\n{ev['code']}", file=sys.stderr)
    elif kind == "exec_result":
        print(f"[result exit={ev.get('exit_code')}] {ev.get('stdout', '')}{ev.get('stderr', '')}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace, cfg: Config) -> int:
    async def one(c: Client, text: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        async for ev in c.stream("chat", text=text):
            if ev.get("event") == "done":
                result = ev.get("result", {})
            else:
                _print_event(ev, args.thoughts)
        if not result.get("speak"):
            print(f"(no reply: {result.get('reason')})", end="")
        print()
        return result

    async def go() -> int:
        async with Client(cfg.socket_path) as c:
            if args.message is not None:
                await asyncio.wait_for(one(c, args.message), args.timeout)
                return 0
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    print()
                    return 0
                if line.strip():
                    await asyncio.wait_for(one(c, line), args.timeout)

    return asyncio.run(go())


def cmd_condition(args: argparse.Namespace, cfg: Config) -> int:
    r = request_sync(cfg.socket_path, "condition", values=dict(args.readings))
    soma = r["soma"]
    print(f"accepted {r['accepted']} reading(s); felt {soma['label']} (charge {soma['charge']})")
    return 0


def cmd_config(args: argparse.Namespace, cfg: Config) -> int:
    if args.config_cmd == "check":
        print(f"configuration OK ({cfg.source or 'built-in defaults'}); socket {cfg.socket_path}, data {cfg.data_dir}")
        return 0
    import dataclasses

    print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    return 0


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "chat": cmd_chat, "condition": cmd_condition,
            "config": cmd_config}

if __name__ == "__main__":
    sys.exit(main())
