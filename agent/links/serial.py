"""Serial link (USB-UART or pty): pyserial opens and configures, the event loop does the I/O.

Reads come through loop.add_reader on the non-blocking descriptor and writes through
add_writer when the kernel buffer is full, so the event loop never blocks on the line.
While the ingest's `intake` is cleared (too many frames wait for a commit) the link stops
reading, so the line pushes back instead of the gateway's memory growing.
A vanished device (unplugged adapter, closed pty) is reopened with backoff.

With a command channel (`commander`, agent/nodecmd.py) the link takes the node's REPLY and
STATUS frames out of the stream for it and passes the rest, whole frames only, to `on_data`.
COMMAND frames wait in their own queue: one is handed to the kernel only when the line's
output queue is empty and no ACK waits, so an ACK is never behind more than one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import termios
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial

from .. import protocol
from ..configfile import Doc
from ..nodecmd import Channel, counters_for
from ..plugins import LinkContext, LinkPlugin

log = logging.getLogger("lantern.link.serial")

ChunkHandler = Callable[["SerialLink", bytes], None]
_TO_CHANNEL = (protocol.REPLY, protocol.STATUS)


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
        self.commander: Channel | None = None  # set by make(): commands to the node(s) here
        self._held = bytearray()  # bytes after the last delimiter (with a commander)
        self._passing = False  # an over-long run: passed on as it comes (ingest counts it)
        self._bulk: deque[bytes] = deque()  # COMMAND frames, sent after any ACK
        self._bulk_timer: asyncio.TimerHandle | None = None
        self.commands_out = 0

    def serves(self, _node: str) -> bool:
        return self.connected

    def send_command(self, ftype: int, body: bytes) -> None:
        """Queue a frame for the line behind ACKs (the channel's sender)."""
        if self._ser is None:
            return  # the channel's timeout says it; LinkDown is raised before sending
        self._bulk.append(protocol.encode_frame(ftype, body))
        if not self._out:
            asyncio.get_running_loop().call_soon(self._writable)

    def _route(self, data: bytes) -> bytes:
        """The bytes for on_data: whole frames, without the REPLY/STATUS the channel takes."""
        assert self.commander is not None
        if self._passing:
            end = data.find(b"\x00")
            if end < 0:
                return data
            self._passing = False
            head, data = data[:end + 1], data[end + 1:]
            return head + self._route(data) if data else head
        buf = self._held + data
        end = buf.rfind(b"\x00")
        if end < 0:
            if len(buf) > protocol.MAX_WIRE:  # no frame: let ingest see it and count it
                self._held.clear()
                self._passing = True
                return bytes(buf)
            self._held = buf
            return b""
        self._held = buf[end + 1:]
        out = bytearray()
        for chunk in bytes(buf[:end]).split(b"\x00"):
            # COBS: a first code byte of 2 or more is followed by the (nonzero) type byte
            if len(chunk) > 1 and chunk[0] >= 2 and chunk[1] in _TO_CHANNEL:
                try:
                    ftype, body = protocol.decode_frame(chunk)
                except Exception:
                    pass  # damaged: ingest counts it as such
                else:
                    self.commander.on_frame(ftype, body)
                    continue
            out += b"\x00" + chunk
        if out:
            out += b"\x00"
        if len(self._held) > protocol.MAX_WIRE:
            out += self._held
            self._held = bytearray()
            self._passing = True
        return bytes(out)

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
        self._bulk.clear()
        self._held.clear()
        self._passing = False
        if self._bulk_timer is not None:
            self._bulk_timer.cancel()
            self._bulk_timer = None
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
        if self.commander is not None:
            data = self._route(data)
        if data:
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

    def _line_busy(self, fd: int) -> int:
        """Bytes still in the kernel's output queue (0 if it cannot say)."""
        try:
            return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0])
        except OSError:
            return 0

    def _next_command(self, fd: int) -> None:
        """Move one COMMAND frame to the write buffer if the line is idle; else look again
        when the kernel should have sent what it holds."""
        if self._ser is None or self._out or not self._bulk or self._bulk_timer is not None:
            return
        queued = self._line_busy(fd)
        if queued:
            self._bulk_timer = asyncio.get_running_loop().call_later(
                max(0.001, queued * 10 / self.baud), self._bulk_due)
            return
        self._out += self._bulk.popleft()
        self.commands_out += 1

    def _bulk_due(self) -> None:
        self._bulk_timer = None
        self._writable()

    def _writable(self) -> None:
        if self._ser is None:
            return
        fd = self._ser.fileno()
        loop = asyncio.get_running_loop()
        if not self._out:
            self._next_command(fd)
            if not self._out:
                loop.remove_writer(fd)
                return
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
            self._next_command(fd)
            if self._out:
                loop.add_writer(fd, self._writable)

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
    link = SerialLink(cfg.port, cfg.baud, ctx.ingest.on_data, ctx.ingest.intake)
    link.commander = Channel(link.name, link.send_command, ctx.keys, counters_for(ctx.state_dir),
                             lambda _node: link.connected)
    return link


PLUGIN = LinkPlugin("serial", frozenset({"port", "baud"}), parse, make, where=lambda c: c.port)
