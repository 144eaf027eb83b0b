"""sd_notify by hand: one datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket).
A no-op when not started by systemd."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("agentd.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, message: str) -> bool:
        """Send one state message (``READY=1``, ``STATUS=...``); False (logged) if it could not go."""
        if not self.address:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), addr)
            return True
        except OSError as exc:
            log.warning("notify_failed", message=message, error=str(exc))
            return False
