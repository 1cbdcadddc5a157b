"""The sd_notify protocol over $NOTIFY_SOCKET, without libsystemd. A no-op outside systemd.

READY=1 once the supervisor serves, RELOADING=1 then READY=1 around a reload, STOPPING=1 when it
drains, STATUS= a one-line summary, WATCHDOG=1 from the loop: a loop that stops turning stops
the pings and systemd restarts the service after WatchdogSec.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr
        # WATCHDOG_PID names the process systemd watches: pings from any other are ignored.
        watched = env.get("WATCHDOG_PID", "")
        usec = env.get("WATCHDOG_USEC", "")
        mine = not watched or watched == str(os.getpid())
        # Ping at half the timeout, and at least once a second (the loop wakes that often).
        self.watchdog_s: float | None = (
            min(1.0, int(usec) / 2e6) if usec.isdigit() and int(usec) > 0 and mine else None
        )
        self.last_ping = 0.0

    def send(self, *fields: str) -> bool:
        """One datagram of KEY=VALUE lines; False when it could not be sent (never raises)."""
        if not self.addr:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.addr)
                sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd tell this reload from an older one (Type=notify-reload).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, mono: float, status: Callable[[], str]) -> bool:
        """Ping when due, with a fresh STATUS; called from every loop iteration."""
        if self.watchdog_s is None or mono - self.last_ping < self.watchdog_s:
            return False
        self.last_ping = mono
        return self.send("WATCHDOG=1", f"STATUS={status()}")
