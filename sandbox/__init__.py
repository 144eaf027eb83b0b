"""Code execution in a resource-limited, namespaced subprocess (see README "Sandbox").

``from sandbox import run, arun, Limits, ExecResult``.
"""

from .core import arun, available_layers, run, shutdown, stats
from .errors import SandboxError, SandboxUnavailable
from .limits import DEFAULT_IMPORTS, LIMIT_KINDS, ExecResult, Limits

__all__ = [
    "DEFAULT_IMPORTS", "LIMIT_KINDS", "ExecResult", "Limits", "SandboxError", "SandboxUnavailable",
    "arun", "available_layers", "run", "shutdown", "stats",
]
