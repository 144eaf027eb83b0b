"""``Limits`` (what a run may use) and ``ExecResult`` (what came of it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_IMPORTS: tuple[str, ...] = (
    "math", "cmath", "statistics", "random", "re", "json", "string", "datetime", "collections",
    "itertools", "functools", "fractions", "decimal", "textwrap", "time",
)

#: Values ``ExecResult.limit`` takes. ``denied`` and ``disabled`` come from the approval gate and the
#: ``[sandbox] enabled`` switch (sandbox.service), never from a run.
LIMIT_KINDS: tuple[str, ...] = (
    "wall", "cpu", "memory", "output", "file_size", "processes", "open_files", "policy", "denied", "disabled",
)


@dataclass(frozen=True)
class Limits:
    """Resource and policy limits of one run. Defaults mirror ``[sandbox]`` in config.toml."""

    wall_s: float = 10.0  # wall clock from fork to kill
    cpu_s: float = 5.0  # RLIMIT_CPU soft (SIGXCPU); hard = soft + 1 s (SIGKILL)
    memory_mb: int = 256  # RLIMIT_AS of every process of the run
    max_output_bytes: int = 65536  # kept per stream (stdout, stderr); more kills the run (limit "output")
    max_file_bytes: int = 1 << 20  # RLIMIT_FSIZE; also sizes the private tmpfs working directory
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 16  # pids cgroup pids.max (per run) and RLIMIT_NPROC (per uid)
    network: bool = False  # False: new network namespace, else a Python-level socket block
    allowed_imports: tuple[str, ...] = DEFAULT_IMPORTS  # top-level modules the code may import
    restricted: bool = True  # RestrictedPython policy layer in front of the OS layers
    user: str = "nobody"  # uid/gid the code runs as when the daemon is root
    namespaces: bool = True  # use PID/mount/network namespaces where the kernel allows (False: tests only)

    def __post_init__(self) -> None:
        # Accept any iterable of names (config gives a list) but keep the dataclass hashable.
        object.__setattr__(self, "allowed_imports", tuple(self.allowed_imports))
        if not 0 < self.wall_s <= 3600 or not 0 < self.cpu_s <= 3600:
            raise ValueError("wall_s and cpu_s must be in (0, 3600]")
        if self.memory_mb < 32 or self.max_output_bytes < 1 or self.max_file_bytes < 0:
            raise ValueError("memory_mb must be >= 32, max_output_bytes >= 1, max_file_bytes >= 0")
        if self.max_open_files < 8 or self.max_processes < 1:
            raise ValueError("max_open_files must be >= 8 and max_processes >= 1")

    @classmethod
    def from_config(cls, section: Any) -> Limits:
        """Build from ``agentd.config.SandboxSection`` (or any object with the same attributes)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(section, n) for n in names if hasattr(section, n)})

    def replace(self, **changes: Any) -> Limits:
        return dataclasses.replace(self, **changes)

    def to_wire(self) -> dict[str, Any]:
        """The JSON the supervisor reads."""
        d = dataclasses.asdict(self)
        d["allowed_imports"] = list(self.allowed_imports)
        d["cpu_soft"] = max(1, math.ceil(self.cpu_s))
        return d


@dataclass
class ExecResult:
    """The outcome of one run. Everything the code did is here; nothing of it is an exception."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0  # the code's exit status; -N when killed by signal N
    timed_out: bool = False  # the wall clock ran out
    limit: str | None = None  # which limit ended or refused the run (see LIMIT_KINDS), None if none
    cpu_s: float = 0.0  # user + system CPU of the run's main process (and the children it reaped)
    peak_rss_mb: float = 0.0
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes
    wall_s: float = 0.0
    layers: dict[str, bool] = field(default_factory=dict)  # isolation layers that applied to this run
    exec_id: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def event_fields(self) -> dict[str, Any]:
        """The fields of an ``exec_result`` event (docs/protocol.md)."""
        keys = ("stdout", "stderr", "exit_code", "timed_out", "limit", "cpu_s", "peak_rss_mb", "truncated")
        return {k: getattr(self, k) for k in keys}
