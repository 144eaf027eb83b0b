"""Configuration: ``config.toml`` + ``AGENTD_<SECTION>__<KEY>`` overrides -> a frozen, validated ``Config``.

Validation happens before anything is touched: an unknown key, a wrong type or an impossible value
raises ``ConfigError`` naming the key (``agentd start`` exits with status 2). Each section is a
frozen dataclass; its field types drive the type check and its ``__post_init__`` checks values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "AGENTD_"
ENV_CONFIG = "AGENTD_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted key at fault (``section.key``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


@dataclass(frozen=True)
class DaemonSection:
    data_dir: str = "~/.local/share/agentd"  # memories, snapshots; systemd sets /var/lib/agentd
    run_dir: str = ""  # lock, socket; "" = $XDG_RUNTIME_DIR/agentd or /tmp/agentd-<uid>
    log_level: str = "info"
    log_format: str = "auto"  # auto (readable on a TTY, JSON otherwise) | json | console
    shutdown_timeout_s: float = 10.0
    torch_threads: int = 0  # 0 = torch's default

    def __post_init__(self) -> None:
        _check(self.log_level in LOG_LEVELS, "daemon.log_level", f"must be one of {LOG_LEVELS}, got {self.log_level!r}")
        _check(self.log_format in ("auto", "json", "console"), "daemon.log_format", f"must be auto, json or console, got {self.log_format!r}")
        _check(self.shutdown_timeout_s > 0, "daemon.shutdown_timeout_s", "must be > 0")
        _check(self.torch_threads >= 0, "daemon.torch_threads", "must be >= 0")
        _check(bool(self.data_dir), "daemon.data_dir", "must not be empty")


@dataclass(frozen=True)
class SocketSection:
    path: str = ""  # "" = <run_dir>/agentd.sock
    mode: str = "0660"  # octal file mode of the socket
    max_line_bytes: int = 1 << 20
    client_queue: int = 1024  # events buffered per client before the oldest are dropped

    def __post_init__(self) -> None:
        try:
            m = int(self.mode, 8)
        except ValueError:
            raise ConfigError("socket.mode", f"must be an octal mode like \"0660\", got {self.mode!r}") from None
        _check(0 < m <= 0o777, "socket.mode", f"must be between 0001 and 0777, got {self.mode!r}")
        _check(self.max_line_bytes >= 1024, "socket.max_line_bytes", "must be >= 1024")
        _check(self.client_queue >= 16, "socket.client_queue", "must be >= 16")


@dataclass(frozen=True)
class BreathSection:
    inhale_s: float = 0.2  # drain the inbox into context
    hold_s: float = 0.2  # recall
    exhale_s: float = 0.0  # minimum length of the acting phase (generation takes what it needs)
    pause_s: float = 5.0  # rest: snapshot, compact; no input read
    wake_on_chat: bool = True  # a chat message cuts a PAUSE short

    def __post_init__(self) -> None:
        for name in ("inhale_s", "hold_s", "exhale_s", "pause_s"):
            v = getattr(self, name)
            _check(0 <= v <= 3600, f"breath.{name}", f"must be between 0 and 3600 seconds, got {v}")


@dataclass(frozen=True)
class AgentSection:
    max_segments_per_turn: int = 16  # loop guard: segments (think/speak/exec) in one turn
    max_execs_per_turn: int = 4  # loop guard: EXECs in one turn
    max_repeat_exec: int = 2  # breaker: the same EXEC code this many times in a turn ends it
    context_tokens: int = 2048  # short-term context kept for snapshots and re-prefill
    observation_max_bytes: int = 4096  # a longer observation is cut, with a marker
    interrupt_on_chat: bool = True  # a chat arriving during a turn interrupts it; it is answered next

    def __post_init__(self) -> None:
        _check(self.max_segments_per_turn >= 1, "agent.max_segments_per_turn", "must be >= 1")
        _check(self.max_execs_per_turn >= 0, "agent.max_execs_per_turn", "must be >= 0")
        _check(self.max_repeat_exec >= 1, "agent.max_repeat_exec", "must be >= 1")
        _check(self.context_tokens >= 64, "agent.context_tokens", "must be >= 64")
        _check(self.observation_max_bytes >= 64, "agent.observation_max_bytes", "must be >= 64")


@dataclass(frozen=True)
class BackboneSection:
    name: str = "nexus"
    checkpoint: str = ""  # a checkpoint directory; "" = random weights of `name` (or the bundled default)
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the architecture's Config
    temperature: float = 0.7
    exec_temperature: float = 0.0  # inside EXEC code: greedy, so copied operands are copied exactly
    top_k: int = 40
    top_p: float = 0.95
    max_tokens: int = 256  # per generation stretch
    silence_entropy: float = 0.0  # nats; 0 disables entropy-gated silence
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.name), "backbone.name", "must not be empty")
        _check(self.temperature >= 0, "backbone.temperature", "must be >= 0")
        _check(self.exec_temperature >= 0, "backbone.exec_temperature", "must be >= 0")
        _check(self.top_k >= 0, "backbone.top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "backbone.top_p", "must be in (0, 1]")
        _check(1 <= self.max_tokens <= 65536, "backbone.max_tokens", "must be between 1 and 65536")
        _check(self.silence_entropy >= 0, "backbone.silence_entropy", "must be >= 0")


@dataclass(frozen=True)
class MemorySection:
    enabled: bool = True
    recall_k: int = 4  # memories recalled into context in HOLD
    recall_budget_tokens: int = 256
    recall_min_score: float = 0.35  # cosine similarity below which a memory is not recalled
    max_memories: int = 0  # retention by count; 0 = unlimited
    max_age_days: float = 0.0  # retention by age; 0 = unlimited
    snapshots_keep: int = 3  # neural-state snapshots kept
    remember: list[str] = field(default_factory=lambda: ["observation", "speak", "exec", "exec_result", "condition"])
    embedding_model: str = ""  # a local sentence-transformers directory; "" = the bundled all-MiniLM-L6-v2
    embedding_batch: int = 64  # most texts embedded at once (concurrent adds are coalesced up to this)
    threads: int = 1  # CPU threads for embedding (torch) and FAISS in the memory worker; 0 = their defaults
    index_switch_at: int = 20000  # memories at which the flat index becomes HNSW
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 64
    index_save_rows: int = 5000  # PAUSE re-snapshots the index after this many new memories

    def __post_init__(self) -> None:
        _check(self.recall_k >= 0, "memory.recall_k", "must be >= 0")
        _check(self.recall_budget_tokens >= 0, "memory.recall_budget_tokens", "must be >= 0")
        _check(-1 <= self.recall_min_score <= 1, "memory.recall_min_score", "must be between -1 and 1")
        _check(self.max_memories >= 0, "memory.max_memories", "must be >= 0")
        _check(self.max_age_days >= 0, "memory.max_age_days", "must be >= 0")
        _check(self.snapshots_keep >= 1, "memory.snapshots_keep", "must be >= 1")
        kinds = ("observation", "speak", "think", "exec", "exec_result", "condition")
        for k in self.remember:
            _check(k in kinds, "memory.remember", f"unknown kind {k!r} (known: {', '.join(kinds)})")
        _check(1 <= self.embedding_batch <= 4096, "memory.embedding_batch", "must be between 1 and 4096")
        _check(self.threads >= 0, "memory.threads", "must be >= 0")
        _check(self.index_switch_at >= 1, "memory.index_switch_at", "must be >= 1")
        _check(4 <= self.hnsw_m <= 128, "memory.hnsw_m", "must be between 4 and 128")
        _check(self.hnsw_ef_construction >= 8, "memory.hnsw_ef_construction", "must be >= 8")
        _check(self.hnsw_ef_search >= 8, "memory.hnsw_ef_search", "must be >= 8")
        _check(self.index_save_rows >= 1, "memory.index_save_rows", "must be >= 1")


@dataclass(frozen=True)
class SandboxSection:
    enabled: bool = True
    approve: str = "auto"  # auto | ask | never
    approve_timeout_s: float = 60.0
    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 256
    max_output_bytes: int = 65536  # kept per stream (stdout, stderr); more ends the run with limit "output"
    max_file_bytes: int = 1 << 20  # RLIMIT_FSIZE; the private tmpfs working dir holds 4x this (>= 4 MiB)
    max_open_files: int = 64
    max_processes: int = 16  # per-run pids cgroup (root) and RLIMIT_NPROC of the sandbox uid
    network: bool = False
    restricted: bool = True  # RestrictedPython policy layer in front of the OS layers
    user: str = "nobody"  # unprivileged user the code runs as when the daemon runs as root
    allowed_imports: list[str] = field(
        default_factory=lambda: ["math", "cmath", "statistics", "random", "re", "json", "string", "datetime",
                                 "collections", "itertools", "functools", "fractions", "decimal", "textwrap", "time"]
    )

    def __post_init__(self) -> None:
        _check(self.approve in ("auto", "ask", "never"), "sandbox.approve", f"must be auto, ask or never, got {self.approve!r}")
        _check(self.approve_timeout_s > 0, "sandbox.approve_timeout_s", "must be > 0")
        _check(0 < self.wall_s <= 3600, "sandbox.wall_s", "must be in (0, 3600]")
        _check(0 < self.cpu_s <= 3600, "sandbox.cpu_s", "must be in (0, 3600]")
        _check(self.memory_mb >= 32, "sandbox.memory_mb", "must be >= 32")
        _check(self.max_output_bytes >= 1, "sandbox.max_output_bytes", "must be >= 1")
        _check(self.max_file_bytes >= 0, "sandbox.max_file_bytes", "must be >= 0")
        _check(self.max_open_files >= 8, "sandbox.max_open_files", "must be >= 8")
        _check(self.max_processes >= 1, "sandbox.max_processes", "must be >= 1")
        _check(bool(self.user), "sandbox.user", "must not be empty")
        for name in self.allowed_imports:
            _check(name.isidentifier(), "sandbox.allowed_imports", f"{name!r} is not a top-level module name")


@dataclass(frozen=True)
class MqttSection:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "agentd"
    username: str = ""
    password_file: str = ""  # the password is read from this file, never written in config
    tls: bool = False
    ca_file: str = ""
    client_id: str = ""  # "" = agentd-<hostname>-<pid>
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_payload_bytes: int = 65536
    offline_queue: int = 256  # SPEAK messages kept while the broker is away; the oldest go first

    def __post_init__(self) -> None:
        _check(bool(self.host), "mqtt.host", "must not be empty")
        _check(1 <= self.port <= 65535, "mqtt.port", f"must be 1..65535, got {self.port}")
        _check(self.offline_queue >= 0, "mqtt.offline_queue", "must be >= 0")
        _check(not self.password_file or bool(self.username), "mqtt.password_file", "needs mqtt.username")
        # Files are checked only when MQTT is on: a disabled bridge must not stop start-up.
        if self.enabled and self.password_file:
            p = Path(os.path.expandvars(self.password_file)).expanduser()
            _check(os.access(p, os.R_OK) and p.is_file(), "mqtt.password_file", f"{p} is not a readable file")
        if self.enabled and self.ca_file:
            _check(self.tls, "mqtt.ca_file", "is set but mqtt.tls is false")
            p = Path(os.path.expandvars(self.ca_file)).expanduser()
            _check(os.access(p, os.R_OK) and p.is_file(), "mqtt.ca_file", f"{p} is not a readable file")
        _check(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "#+"), "mqtt.topic_prefix", "must be non-empty without # or +")
        _check(self.keepalive_s >= 5, "mqtt.keepalive_s", "must be >= 5")
        _check(0 < self.reconnect_min_s <= self.reconnect_max_s, "mqtt.reconnect_min_s", "must be > 0 and <= reconnect_max_s")
        _check(self.max_payload_bytes >= 16, "mqtt.max_payload_bytes", "must be >= 16")


def _default_ranges() -> dict[str, list[float]]:
    return {
        "latency": [0.0, 200.0],  # ms
        "voltage": [11.0, 13.0],  # V
        "temperature": [10.0, 45.0],  # deg C
        "error_rate": [0.0, 0.05],
        "bandwidth": [1.0, 1000.0],  # Mbit/s
    }


@dataclass(frozen=True)
class SomaSection:
    ranges: dict[str, list[float]] = field(default_factory=_default_ranges)  # name -> [low, high] comfortable range
    alert_charge: float = 0.4  # overall charge at or above which the felt state is "alert"
    urgent_charge: float = 0.8
    alert_breath_factor: float = 0.5  # breath durations scale by this when alert
    urgent_breath_factor: float = 0.25  # breath durations scale by this when urgent
    calm_pause_factor: float = 2.0  # PAUSE lengthens by this when calm and idle

    def __post_init__(self) -> None:
        for name, r in self.ranges.items():
            ok = isinstance(r, list) and len(r) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in r)
            _check(ok, f"soma.ranges.{name}", f"must be [low, high] numbers, got {r!r}")
            _check(r[0] < r[1], f"soma.ranges.{name}", f"low must be < high, got {r!r}")
        _check(0 < self.alert_charge < self.urgent_charge <= 1, "soma.alert_charge", "need 0 < alert_charge < urgent_charge <= 1")
        _check(0 < self.alert_breath_factor <= 1, "soma.alert_breath_factor", "must be in (0, 1]")
        _check(0 < self.urgent_breath_factor <= self.alert_breath_factor, "soma.urgent_breath_factor",
               "must be in (0, alert_breath_factor]: an urgent breath is never slower than an alert one")
        _check(self.calm_pause_factor >= 1, "soma.calm_pause_factor", "must be >= 1")


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    socket: SocketSection = field(default_factory=SocketSection)
    breath: BreathSection = field(default_factory=BreathSection)
    agent: AgentSection = field(default_factory=AgentSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    memory: MemorySection = field(default_factory=MemorySection)
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    soma: SomaSection = field(default_factory=SomaSection)
    source: str = ""  # the file it was read from ("" = built-in defaults)

    # -- derived paths --------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(os.path.expandvars(self.daemon.data_dir)).expanduser()

    @property
    def run_dir(self) -> Path:
        if self.daemon.run_dir:
            return Path(os.path.expandvars(self.daemon.run_dir)).expanduser()
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        return Path(xdg) / "agentd" if xdg else Path(f"/tmp/agentd-{os.getuid()}")

    @property
    def socket_path(self) -> Path:
        if self.socket.path:
            return Path(os.path.expandvars(self.socket.path)).expanduser()
        return self.run_dir / "agentd.sock"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "agentd.lock"

    @property
    def socket_mode(self) -> int:
        return int(self.socket.mode, 8)


SECTIONS: dict[str, type] = {k: v for k, v in typing.get_type_hints(Config).items() if k != "source"}


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, int | float) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        _check(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        _check(isinstance(value, dict), key, f"must be a table, got {value!r}")
        return {k: (v if item is Any else _coerce(f"{key}.{k}", item, v)) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(key, alt, value)
            except ConfigError:
                continue
        raise ConfigError(key, f"has the wrong type: {value!r}")
    raise ConfigError(key, f"unsupported type {tp!r}")  # a programming error in this module


def _build_section(name: str, cls: type, raw: Any) -> Any:
    _check(isinstance(raw, dict), name, f"must be a table ([{name}]), got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        _check(k in known, f"{name}.{k}", f"unknown key (known: {', '.join(sorted(known))})")
    values = {k: _coerce(f"{name}.{k}", hints[k], v) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, str(exc)) from exc


def _parse_env_value(text: str) -> Any:
    """An override is a TOML value when it parses as one (``5``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``AGENTD_<SECTION>__<KEY>=value`` pairs as nested tables (``AGENTD_CONFIG`` excluded)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        _check(section in SECTIONS, name, f"unknown section {section!r} (known: {', '.join(SECTIONS)})")
        out.setdefault(section, {})[key] = _parse_env_value(value)
    return out


def from_dict(raw: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document into a Config."""
    for name in raw:
        _check(name in SECTIONS, name, f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(**sections, source=source)


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``$AGENTD_CONFIG``; none = defaults) and apply environment overrides."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_CONFIG) or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("", f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    for section, values in env_overrides(environ).items():
        table = raw.setdefault(section, {})
        _check(isinstance(table, dict), section, "must be a table")
        table.update(values)
    return from_dict(raw, source=str(path or ""))


def replace(config: Config, section: str, **changes: Any) -> Config:
    """A copy of ``config`` with keys of one section changed (for SIGHUP reloads and tests)."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def check_backbone(config: Config) -> None:
    """Validate ``[backbone] name`` and ``[backbone.options]`` against the architecture's own Config
    (and, for a backbone that needs one, its secret: the remote backbone's API key file), so that a
    bad option stops ``agentd start`` with exit status 2 before anything is touched. Imports
    ``models`` (torch), so it is a separate step from ``load``."""
    from models.base import BackboneConfigError, ModelError, get_class, make_config

    b = config.backbone
    try:
        cls = get_class(b.name)
    except BackboneConfigError as exc:
        raise ConfigError("backbone.name", str(exc)) from None
    if b.checkpoint:  # the checkpoint carries its own config; options are not used (see load_backbone)
        return
    try:
        arch_config = make_config(cls, b.options)
        check = getattr(cls, "check_config", None)
        if callable(check):
            check(arch_config)
    except ModelError as exc:
        message = str(exc).removeprefix(f"{cls.name}: ")
        named = [k for k in b.options if re.search(rf"\b{re.escape(k)}\b", message)]
        raise ConfigError(f"backbone.options.{named[0]}" if named else "backbone.options", message) from None
