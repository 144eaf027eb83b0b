"""The one exception root of the sandbox package."""

from __future__ import annotations


class SandboxError(Exception):
    """The sandbox machinery itself failed (fork server gone, protocol broken, unsafe set-up refused).

    Never raised for anything the sandboxed code does: a crash, a timeout or a limit of the code is
    an :class:`~sandbox.ExecResult`, not an exception.
    """


class SandboxUnavailable(SandboxError):
    """An isolation layer the configuration requires cannot be applied on this host."""
