"""A serial line with a baud rate, between two ptys (a pty alone moves bytes at memory speed).

Each direction is a UART at `baud` with 8N1 framing: 10 bit times per byte, no gaps, so at
most baud/10 bytes per second. The line serialises what is queued and idles when nothing
is; bytes are handed over every millisecond or so, in the amount the line would have
carried by then. The sender side holds at most a UART-sized TX buffer before the pty
pushes back on the writer, as a real UART driver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import time
import tty
from collections.abc import Callable

TX_BUFFER = 256  # bytes the sending side's driver holds (ESP-IDF UART default is 256+)
TICK_S = 0.001

Tap = Callable[[str, bytes, float], None]


def _open_pty() -> tuple[int, int, str]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class _Direction:
    def __init__(self, name: str, src: int, dst: int, bytes_per_s: float) -> None:
        self.name, self.src, self.dst, self.rate = name, src, dst, bytes_per_s
        self.queue = bytearray()  # bytes in the sender's TX buffer, not yet on the line
        self.busy_since = 0.0  # when the line started its current run of bytes
        self.sent_in_run = 0
        self.idle_at = 0.0  # when the last byte of the previous run finished
        self.carried = 0


class PacedLine:
    """node pty ⇄ line at `baud` ⇄ gateway pty; `tap(direction, bytes, time)` sees delivery."""

    def __init__(self, baud: int, tap: Tap | None = None, tap_sent: Tap | None = None) -> None:
        self.baud = baud
        self.tap = tap
        self.tap_sent = tap_sent  # sees bytes when the sender writes them (wall-clock time)
        self.node_master, self._node_slave, self.node_port = _open_pty()
        self.gw_master, self._gw_slave, self.gateway_port = _open_pty()
        rate = baud / 10.0
        self._dirs = {"up": _Direction("up", self.node_master, self.gw_master, rate),
                      "down": _Direction("down", self.gw_master, self.node_master, rate)}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _fill(self, d: _Direction, now: float) -> None:
        room = TX_BUFFER - len(d.queue)
        if room <= 0:
            return  # the pty keeps the rest: the writer blocks as on a full UART buffer
        try:
            data = os.read(d.src, room)
        except (BlockingIOError, OSError):
            return
        if data:
            if self.tap_sent:
                self.tap_sent(d.name, data, time.time())
            if not d.queue:
                d.busy_since = max(now, d.idle_at)  # the line resumes where it stopped
                d.sent_in_run = 0
            d.queue += data

    def _drain(self, name: str, d: _Direction, now: float) -> None:
        if not d.queue:
            return
        due = int((now - d.busy_since) * d.rate) - d.sent_in_run
        if due <= 0:
            return
        chunk = bytes(d.queue[:due])
        try:
            n = os.write(d.dst, chunk)
        except BlockingIOError:
            n = 0
        if n <= 0:
            return  # the receiver's pty is full: a real line would overrun; we wait
        del d.queue[:n]
        d.sent_in_run += n
        d.carried += n
        if not d.queue:
            d.idle_at = d.busy_since + d.sent_in_run / d.rate
        if self.tap:
            self.tap(name, chunk[:n], now)

    async def _run(self) -> None:
        while True:
            now = time.perf_counter()
            for name, d in self._dirs.items():
                self._fill(d, now)
                self._drain(name, d, now)
            await asyncio.sleep(TICK_S)

    def carried(self, direction: str) -> int:
        return self._dirs[direction].carried

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for fd in (self.node_master, self._node_slave, self.gw_master, self._gw_slave):
            with contextlib.suppress(OSError):
                os.close(fd)
