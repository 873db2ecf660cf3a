"""The systemd notify protocol (sd_notify(3)), spoken directly over $NOTIFY_SOCKET.

No libsystemd: a datagram of `KEY=value` lines to a unix socket is the whole protocol.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the gateway runs the same
way from a shell, a test or a unit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("lantern.sdnotify")


class Notifier:
    """Sends READY, STATUS, WATCHDOG and STOPPING to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_usec = self._watchdog(env)
        self.sent = 0
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> int:
        """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID absent or ours)."""
        pid = env.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return 0
        return max(usec, 0)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def _target(self) -> str | bytes:
        # '@' names a socket in the abstract namespace: a leading NUL byte on the wire
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, **fields: str | int) -> bool:
        """Send one message; False (logged once) when the manager cannot be reached."""
        if self._sock is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self._target())
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("NOTIFY_SOCKET %s: cannot send (%s); the service manager will not "
                            "hear from us", self.address, e.strerror or e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=_one_line(status), MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=_one_line(status))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=_one_line(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


async def supervise(notifier: Notifier, health: Callable[[], Awaitable[str]],
                    status_every_s: float = 10.0) -> None:
    """Ping the watchdog only while the gateway really works, and keep STATUS= current.

    `health` must go through the event loop and the store's thread (it reads the queue), so
    a wedged store or a blocked loop stops the pings and systemd restarts us.
    """
    if not notifier.enabled:
        await asyncio.Event().wait()  # no service manager: nothing to tell, run until cancelled
    interval = notifier.watchdog_interval_s
    period = min(interval, status_every_s) if interval else status_every_s
    missed = 0
    while True:
        try:
            line = await asyncio.wait_for(health(), timeout=interval or period)
        except Exception as e:  # a failing check means: no ping, say why once
            missed += 1
            if missed == 1:
                log.error("health check failed (%r); withholding the watchdog ping", e)
        else:
            if missed:
                log.info("health check passes again after %d misses", missed)
            missed = 0
            notifier.status(line)
            if interval:
                notifier.watchdog()
        await asyncio.sleep(period)
