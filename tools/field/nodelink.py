"""The tool's side of node diagnostics: COMMAND out, REPLY / STATUS back.

docs/protocol.md ("Diagnostics") is the normative description.

A session never acknowledges DATA: frames the gateway has not stored stay in the node's
outbox however long a technician looks at them. It only decodes them to show live readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lantern.agent import protocol
from lantern.agent.errors import FrameError
from lantern.agent.nodecmd import (
    ALG,
    CODES,
    E_BIG,
    OP_CLEAR_FAULTS,
    OP_IDENTIFY,
    OP_LATEST,
    OP_REBOOT,
    OP_SELF_TEST,
    OP_SET_INTERVAL,
    OP_STATUS,
    OP_SYNC_TIME,
    PROTOCOL,
    R_BAD_MAC,
    R_MALFORMED,
    R_PROBE,
    R_REPLAY,
    REASONS,
    TAG_LEN,
    Identity,
    aad,
    command_frame,
    parse_status,
    seal,
    unseal,
)

# the wire, shared with the gateway's command channel (agent/nodecmd.py): defined there once
__all__ = [
    "ALG", "CODES", "E_BIG", "OP_CLEAR_FAULTS", "OP_IDENTIFY", "OP_LATEST", "OP_REBOOT",
    "OP_SELF_TEST", "OP_SET_INTERVAL", "OP_STATUS", "OP_SYNC_TIME", "PROTOCOL", "REASONS",
    "R_BAD_MAC", "R_MALFORMED", "R_PROBE", "R_REPLAY", "TAG_LEN", "Identity", "aad",
    "command_frame", "parse_status", "seal", "unseal"]
OPS = {"status": OP_STATUS, "self-test": OP_SELF_TEST, "set-interval": OP_SET_INTERVAL,
       "sync-time": OP_SYNC_TIME, "reboot": OP_REBOOT, "clear-faults": OP_CLEAR_FAULTS,
       "identify": OP_IDENTIFY, "latest": OP_LATEST}


class DiagError(Exception):
    """The node did not answer, or not in a way we can use; the message says what to try."""


class Refused(DiagError):
    """The node answered a COMMAND with a STATUS: it did not accept it (reason code)."""

    def __init__(self, reason: int, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


PROBE = protocol.encode_frame(protocol.COMMAND, b"")


@dataclass
class Reading:
    """One DATA frame seen on the line, decoded (never acknowledged)."""

    node_id: str
    seq: int
    verified: bool
    records: list[dict[str, Any]]
    seen: float = field(default_factory=time.time)


def decode_data(body: bytes, keys: dict[str, bytes]) -> Reading:
    m = protocol.parse_mac0(body)
    node = m.kid.decode("utf-8", "replace")
    key = keys.get(node)
    if key is not None:
        protocol.verify_mac0(key, m)
    return Reading(node, m.seq, key is not None, protocol.resolve_pack(m.payload, node=node))


class Transport(Protocol):
    """A byte link to one node, UART-framed both ways: serial here, BLE in field/diag_ble.py."""

    name: str

    async def open(self) -> None: ...
    def send(self, data: bytes) -> None: ...
    async def recv(self, timeout: float) -> bytes: ...
    async def close(self) -> None: ...


class SerialTransport:
    """A USB-UART (or pty) opened raw and exclusive; reads through the event loop."""

    def __init__(self, port: str, baud: int) -> None:
        self.name = f"{port} at {baud} baud"
        self.port, self.baud = port, baud
        self._ser: Any = None
        self._q: asyncio.Queue[bytes] = asyncio.Queue()

    async def open(self) -> None:
        import serial

        ser = serial.Serial()
        ser.port, ser.baudrate, ser.timeout, ser.write_timeout = self.port, self.baud, 0, 2
        ser.exclusive = True
        try:
            ser.open()
        except (serial.SerialException, OSError) as e:
            busy = "busy" in str(e).lower() or "lock" in str(e).lower()
            raise DiagError(
                f"cannot open {self.port}: {e}" + (
                    "; another program (the gateway, a terminal, mpremote) holds the port: "
                    "stop it first" if busy else
                    "; is the cable plugged in? list ports with `ls /dev/ttyUSB* /dev/ttyACM*`")
            ) from None
        self._ser = ser
        asyncio.get_running_loop().add_reader(ser.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._ser.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._q.put_nowait(data)

    def send(self, data: bytes) -> None:
        self._ser.write(data)

    async def recv(self, timeout: float) -> bytes:
        return await asyncio.wait_for(self._q.get(), timeout)

    async def close(self) -> None:
        if self._ser is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ser.fileno())
            self._ser.close()
            self._ser = None


@dataclass
class LineStats:
    """What the tool itself saw on the line."""

    frames: int = 0
    bad_frames: int = 0
    data_frames: int = 0
    other: dict[str, int] = field(default_factory=dict)


class NodeSession:
    """Talks to one node over a transport: probe, authenticated commands, DATA watching."""

    def __init__(self, transport: Transport, keys: dict[str, bytes], node_id: str | None = None,
                 timeout: float = 2.0, retries: int = 3,
                 on_reading: Callable[[Reading], None] | None = None) -> None:
        self.t = transport
        self.keys = keys
        self.node_id = node_id
        self.timeout = timeout
        self.retries = retries
        self.on_reading = on_reading
        self.identity: Identity | None = None
        self.readings: list[Reading] = []
        self.line = LineStats()
        self._deframer = protocol.Deframer()
        self._frames: list[tuple[int, bytes]] = []
        self._last_counter = 0

    @property
    def key(self) -> bytes | None:
        return self.keys.get(self.node_id) if self.node_id else None

    async def _next_frame(self, deadline: float) -> tuple[int, bytes] | None:
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                data = await self.t.recv(left)
            except TimeoutError:
                return None
            for chunk in self._deframer.feed(data):
                try:
                    if chunk is None:
                        raise FrameError("oversize")
                    self._frames.append(protocol.decode_frame(chunk))
                    self.line.frames += 1
                except FrameError:
                    self.line.bad_frames += 1
        return self._frames.pop(0)

    def _on_data(self, body: bytes) -> None:
        self.line.data_frames += 1
        try:
            r = decode_data(body, self.keys)
        except FrameError as e:
            self.line.other[f"data {e.kind}"] = self.line.other.get(f"data {e.kind}", 0) + 1
            return
        self.readings.append(r)
        del self.readings[:-50]
        if self.on_reading:
            self.on_reading(r)

    async def _wait(self, want: Callable[[int, bytes], bool], seconds: float
                    ) -> tuple[int, bytes] | None:
        deadline = time.monotonic() + seconds
        while (f := await self._next_frame(deadline)) is not None:
            ftype, body = f
            if ftype == protocol.DATA:
                self._on_data(body)  # shown, never acknowledged
            if want(ftype, body):
                return f
        return None

    async def wait_for_frame(self, types: tuple[int, ...], seconds: float
                             ) -> tuple[int, bytes] | None:
        """The next frame of one of `types` (DATA seen meanwhile is decoded, as always)."""
        return await self._wait(lambda t, b: t in types, seconds)

    async def watch(self, seconds: float) -> None:
        """Only listen (DATA frames go to on_reading)."""
        await self._wait(lambda t, b: False, seconds)

    async def probe(self) -> Identity:
        """Ask the node who it is; learns the node id when none was given."""
        for _ in range(self.retries):
            self.t.send(PROBE)
            f = await self._wait(lambda t, b: t == protocol.STATUS, self.timeout)
            if f is None:
                continue
            ident = parse_status(f[1], None)
            if self.node_id is None:
                self.node_id = ident.node_id
            elif ident.node_id != self.node_id:
                raise DiagError(f"the node on {self.t.name} is {ident.node_id}, not "
                                f"{self.node_id}: check the cable, or drop --id")
            key = self.key
            if key is not None:
                try:
                    ident = parse_status(f[1], key)
                except FrameError:
                    raise Refused(
                        R_BAD_MAC,
                        f"node {ident.node_id} answered, but its STATUS does not verify under "
                        "the key we hold for it: wrong key file, or the node was provisioned "
                        "again with a new key") from None
            self.identity = ident
            self._last_counter = max(self._last_counter, ident.floor)
            return ident
        raise DiagError(no_answer(self.t.name))

    def next_counter(self) -> int:
        """A command counter the node has not seen from us: Unix ms, but always increasing.

        Unix milliseconds need no coordination between tools; the node only wants "larger".
        A node can answer within the millisecond, so the clock alone may repeat a counter.
        """
        c = max(time.time_ns() // 1_000_000, self._last_counter + 1)
        self._last_counter = c
        return c

    async def command(self, op: int, args: dict[int, Any] | None = None,
                      timeout: float | None = None, retries: int | None = None
                      ) -> tuple[int, Any, float]:
        """(result code, result, round trip s) of one authenticated command."""
        if self.identity is None:
            await self.probe()
        key = self.key
        if key is None or self.node_id is None:
            raise DiagError(f"no key for node {self.node_id}: pass --keys (the gateway's "
                            "keys.toml) or --key-file (the node's node.key)")
        node_id = self.node_id
        tries = retries or self.retries
        for _ in range(tries):
            counter = self.next_counter()
            t0 = time.monotonic()
            self.t.send(command_frame(key, node_id, counter, op, args))

            def answer(t: int, b: bytes, counter: int = counter) -> bool:
                if t not in (protocol.STATUS, protocol.REPLY):
                    return False
                try:
                    if t == protocol.REPLY:
                        return unseal(key, b, t)[1] == counter
                    ident = parse_status(b, None)
                    # a forged STATUS must not stop us; a node holding another key cannot
                    # sign one we can check, and says so with R_BAD_MAC
                    return ident.reason == R_BAD_MAC or bool(parse_status(b, key))
                except FrameError as e:
                    self.line.other[f"answer {e.kind}"] = self.line.other.get(
                        f"answer {e.kind}", 0) + 1
                    return False

            f = await self._wait(answer, timeout or self.timeout)
            if f is None:
                continue  # lost on the line: a fresh counter, so the node will accept it
            rtt = time.monotonic() - t0
            ftype, body = f
            if ftype == protocol.STATUS:
                ident = parse_status(body, None)
                if ident.reason == R_REPLAY:
                    self._last_counter = max(self._last_counter, ident.floor)
                    continue  # its counter was ahead of our clock: now we know the floor
                raise Refused(ident.reason, f"node {node_id} refused the command: "
                              f"{REASONS.get(ident.reason, ident.reason)}")
            _, _, payload = unseal(key, body, protocol.REPLY)
            if not isinstance(payload, dict):
                raise DiagError("REPLY payload is not a map")
            return int(payload.get(2, -1)), payload.get(3), rtt
        raise DiagError(f"node {node_id} on {self.t.name} did not answer the command "
                        f"({tries} tries, {timeout or self.timeout:g} s each)")


def no_answer(where: str) -> str:
    fast = "115200" in where
    return (f"no node answered on {where}: is it powered? is another program holding the port? "
            + ("try --baud 921600" if fast else "try --baud 115200")
            + "; a node with older firmware (before diagnostics) stays silent too")
