"""Serial link (USB-UART or pty): pyserial opens and configures, the event loop does the I/O.

Reads come through loop.add_reader on the non-blocking descriptor and writes through
add_writer when the kernel buffer is full, so the event loop never blocks on the line.
While the ingest's `intake` is cleared (too many frames wait for a commit) the link stops
reading, so the line pushes back instead of the gateway's memory growing.
A vanished device (unplugged adapter, closed pty) is reopened with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial

from ..configfile import Doc
from ..plugins import LinkContext, LinkPlugin

log = logging.getLogger("lantern.link.serial")

ChunkHandler = Callable[["SerialLink", bytes], None]


class SerialLink:
    def __init__(self, port: str, baud: int, on_data: ChunkHandler,
                 intake: asyncio.Event | None = None) -> None:
        self.name = f"serial:{port}"
        self.port = port
        self.baud = baud
        self._on_data = on_data
        self._intake = intake
        self._resume: asyncio.Task[None] | None = None
        self.pauses = 0  # times reading stopped for the ingest to catch up
        self._ser: serial.Serial | None = None
        self._out = bytearray()
        self._closed = asyncio.Event()
        self.connected = False
        self.bytes_in = 0
        self.bytes_out = 0

    def _open(self) -> None:
        ser = serial.Serial()
        ser.port = self.port
        ser.baudrate = self.baud
        ser.timeout = 0
        ser.write_timeout = 0
        ser.exclusive = True
        ser.open()
        self._ser = ser
        loop = asyncio.get_running_loop()
        loop.add_reader(ser.fileno(), self._readable)
        self.connected = True
        self._closed.clear()

    def _drop(self, why: str) -> None:
        if self._ser is None:
            return
        loop = asyncio.get_running_loop()
        fd = self._ser.fileno()
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        with contextlib.suppress(OSError):
            self._ser.close()
        self._ser = None
        self._out.clear()
        self.connected = False
        log.warning("%s: link lost (%s); reopening", self.name, why)
        self._closed.set()

    def _readable(self) -> None:
        assert self._ser is not None
        try:
            data = os.read(self._ser.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(e.strerror or str(e))
            return
        if not data:
            self._drop("end of file")
            return
        self.bytes_in += len(data)
        self._on_data(self, data)
        if self._intake is not None and not self._intake.is_set() and self._ser is not None:
            asyncio.get_running_loop().remove_reader(self._ser.fileno())
            self.pauses += 1
            self._resume = asyncio.get_running_loop().create_task(self._read_again())

    async def _read_again(self) -> None:
        """Resume reading once the ingest has committed what it holds."""
        assert self._intake is not None
        await self._intake.wait()
        self._resume = None
        if self._ser is not None:
            asyncio.get_running_loop().add_reader(self._ser.fileno(), self._readable)

    def send(self, data: bytes) -> None:
        """Queue bytes for the line; written as soon as the kernel takes them."""
        if self._ser is None:
            return  # the node retransmits whatever an ACK lost here would have confirmed
        was_empty = not self._out
        self._out += data
        if was_empty:
            # on the loop's next turn: the ACKs of one commit leave in one write
            asyncio.get_running_loop().call_soon(self._writable)

    def _writable(self) -> None:
        if self._ser is None:
            return
        fd = self._ser.fileno()
        loop = asyncio.get_running_loop()
        try:
            n = os.write(fd, self._out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno == errno.EAGAIN:
                n = 0
            else:
                self._drop(e.strerror or str(e))
                return
        self.bytes_out += n
        del self._out[:n]
        if self._out:
            loop.add_writer(fd, self._writable)
        else:
            loop.remove_writer(fd)

    async def run(self) -> None:
        """Keep the device open for as long as the gateway runs."""
        delay = 0.5
        failures = 0
        try:
            while True:
                try:
                    self._open()
                    log.info("%s: open at %d baud", self.name, self.baud)
                    delay, failures = 0.5, 0
                    await self._closed.wait()
                except (serial.SerialException, OSError) as e:
                    failures += 1
                    # once at warning; a device that stays away is not news every 30 s
                    log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                            "%s: cannot open (%s); retrying with backoff up to 30 s",
                            self.name, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        finally:
            if self._resume is not None:
                self._resume.cancel()
            if self._ser is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._ser.fileno())
                loop.remove_writer(self._ser.fileno())
                self._ser.close()


# ---------------------------------------------------------------- plug-in ([[links.serial]])


@dataclass(frozen=True)
class SerialLinkConfig:
    port: str
    baud: int = 115200


# What a serial port takes: Linux sets any rate through termios2 (BOTHER) but not beyond what
# USB-UART bridges and the ESP32's UART run (3-5 Mbaud); a larger number is a typo.
BAUD_MAX = 4_000_000


def _baud(v: int) -> str | None:
    return None if 50 <= v <= BAUD_MAX else f"must be 50 to {BAUD_MAX} (e.g. 115200)"


def parse(doc: Doc, tables: list[dict[str, Any]], _base: Path) -> tuple[SerialLinkConfig, ...]:
    out = []
    for i, s in enumerate(tables):
        key = f"links.serial[{i}]"
        out.append(SerialLinkConfig(
            port=doc.get(s, "port", f"{key}.port", str, fix='the device, e.g. "/dev/ttyUSB0"'),
            baud=doc.get(s, "baud", f"{key}.baud", int, 115200, _baud)))
    return tuple(out)


def make(cfg: SerialLinkConfig, ctx: LinkContext) -> SerialLink:
    return SerialLink(cfg.port, cfg.baud, ctx.ingest.on_data, ctx.ingest.intake)


PLUGIN = LinkPlugin("serial", frozenset({"port", "baud"}), parse, make, where=lambda c: c.port)
