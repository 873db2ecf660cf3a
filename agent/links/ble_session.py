"""One GATT connection to a Lantern node: start its drain, feed its frames to ingest, write ACKs.

The Lantern service (docs/ble.md): DATA notifies node → gateway messages, CTRL takes
gateway → node writes, STATE (read/notify) holds the node's backlog. A message is
`type | body` as on the UART, without COBS or CRC, cut into segments that fit the ATT MTU,
each behind a header byte (bit 7: more follow; bits 0-6: index). The start ACK carries the
nonce the node put in STATE for this connection, so a recorded one starts no drain elsewhere.

COMMAND messages (agent/nodecmd.py) wait in their own queue: the writer takes one only when
no ACK waits, so an ACK is never behind more than one command. While the gateway commands
the node (`hold`), the session stays open after the backlog reaches 0, up to its own limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import cbor2
from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic

from .. import protocol
from ..errors import FrameError

log = logging.getLogger("lantern.link.ble")

SERVICE_UUID = "9f1c0001-6c61-6e74-6572-6e2d626c6501"
DATA_UUID = "9f1c0002-6c61-6e74-6572-6e2d626c6501"
CTRL_UUID = "9f1c0003-6c61-6e74-6572-6e2d626c6501"
STATE_UUID = "9f1c0004-6c61-6e74-6572-6e2d626c6501"
SEG_MORE = 0x80
MAX_SEGMENTS = 128
ACK_NONCE = 3  # start ACK: the connection's nonce, from STATE (docs/ble.md)
NONCE_LEN = 8


def segments(msg: bytes, size: int) -> list[bytes]:
    """A message as segments of at most `size` bytes, header byte included."""
    step = size - 1
    parts = [msg[i:i + step] for i in range(0, len(msg), step)] or [b""]
    if len(parts) > MAX_SEGMENTS:
        raise ValueError(f"message of {len(msg)} bytes needs more than {MAX_SEGMENTS} segments")
    last = len(parts) - 1
    return [bytes((i | (SEG_MORE if i < last else 0),)) + p for i, p in enumerate(parts)]


class Reassembler:
    """Joins segments into messages; a gap, a bad index or an overlong message is a FrameError."""

    def __init__(self, limit: int = protocol.MAX_FRAME) -> None:
        self._buf = bytearray()
        self._next = 0
        self._limit = limit

    def feed(self, seg: bytes) -> bytes | None:
        if not seg:
            raise FrameError("segment", "empty segment")
        idx, expected = seg[0] & 0x7F, self._next
        if idx != expected:
            self._buf.clear()
            self._next = 0
            if idx:
                raise FrameError("segment", f"segment {idx}, expected {expected}")
        self._buf += seg[1:]
        if len(self._buf) > self._limit:
            self._buf.clear()
            self._next = 0
            raise FrameError("oversize", f"message over {self._limit} bytes")
        if seg[0] & SEG_MORE:
            self._next = idx + 1
            return None
        msg = bytes(self._buf)
        self._buf.clear()
        self._next = 0
        return msg


def state_nonce(data: bytes | bytearray) -> bytes | None:
    """The connection nonce in a STATE value; None from a node before nonces (3 bytes)."""
    if len(data) >= 3 + NONCE_LEN and data[0] == 1:
        return bytes(data[3:3 + NONCE_LEN])
    return None


def start_message(key: bytes, node: str, nonce: bytes | None = None) -> bytes:
    """An ACK naming no frame, bound to one connection by its nonce: only the key holder can
    start a drain, and only on the connection it read the nonce from.

    It carries no time (key 2): a node sets its clock only from an ACK for a frame in flight
    (node/link_ble.py), which a start never is, and the gateway hands out no time it has not
    checked (docs/time.md) — the ACKs that follow carry it when its clock is synchronised."""
    ack: dict[int, Any] = {protocol.ACK_SEQS: []}
    if nonce is not None:
        ack[ACK_NONCE] = nonce
    payload = cbor2.dumps(ack, canonical=True)
    return bytes((protocol.ACK,)) + protocol.create_mac0(key, node.encode(), 0, payload)


# () -> (monotonic time until which the gateway wants the connection kept, commands unanswered)
Hold = Callable[[], tuple[float, int]]


class NodeSession:
    """The link object ingest sees for one connection (`name`, `send`).

    on_ready(session) is called once notifications are on and the start is queued: from then
    on `send_command` reaches the node.
    """

    def __init__(self, name: str, node: str, key: bytes,
                 on_frame: Callable[[NodeSession, int, bytes], None],
                 on_reject: Callable[[str, FrameError], None],
                 on_ready: Callable[[NodeSession], None] | None = None) -> None:
        self.name = name
        self.node = node
        self._key = key
        self._on_frame = on_frame
        self._on_reject = on_reject
        self._on_ready = on_ready
        self._rx = Reassembler()
        self._acks: deque[bytes] = deque()  # start and ACK messages: written first
        self._cmds: deque[bytes] = deque()  # COMMAND messages: when no ACK waits
        self._queued = asyncio.Event()
        self._progress = asyncio.Event()
        self._error: BaseException | None = None
        self.backlog: int | None = None
        self.nonce: bytes | None = None  # the one our last start ACK carried
        self.open = False
        self.ready = False  # notifications on, start queued: commands may go
        self.frames = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.commands_out = 0
        self.ended_by = ""  # "drained", "limit", "command_limit", "stall" once run() returned

    def send(self, data: bytes) -> None:
        """Take an ACK framed for the UART (what ingest writes) and queue it for CTRL."""
        if not self.open:
            return  # the node keeps the frames and resends them on the next connection
        for chunk in data.split(b"\x00"):
            if chunk:
                ftype, body = protocol.decode_frame(chunk)
                self._acks.append(bytes((ftype,)) + body)
        self._queued.set()

    def send_command(self, ftype: int, body: bytes) -> bool:
        """Queue a COMMAND message behind any ACK; False if the session cannot take it."""
        if not self.ready or not self.open:
            return False
        self._cmds.append(bytes((ftype,)) + body)
        self._queued.set()
        return True

    def _idle(self) -> bool:
        return not self._acks and not self._cmds

    def lost(self) -> None:
        """The stack says the connection dropped: end now, not after idle_s of silence (the
        write under way is cancelled by the stack, so the writer cannot say it)."""
        if self._error is None:
            self._error = ConnectionError("the connection dropped")
        self._progress.set()

    def _on_data(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        self.bytes_in += len(data)
        try:
            msg = self._rx.feed(bytes(data))
            if msg is None:
                return
            if not msg:
                raise FrameError("short", "empty message")
        except FrameError as e:
            self._on_reject(self.name, e)
            return
        self.frames += 1
        self._on_frame(self, msg[0], msg[1:])
        self._progress.set()

    def _on_state(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        if len(data) >= 3 and data[0] == 1:
            self.backlog = int.from_bytes(data[1:3], "little")
            nonce = state_nonce(data)
            if nonce is not None and nonce != self.nonce and self.open:
                # our start carried another nonce (read before the node had set this
                # connection's): the node tells us the right one, start again with it
                self._start(nonce)
            self._progress.set()

    def _start(self, nonce: bytes | None) -> None:
        self.nonce = nonce
        self._acks.append(start_message(self._key, self.node, nonce))
        self._queued.set()

    async def _writer(self, client: BleakClient, ctrl: BleakGATTCharacteristic) -> None:
        try:
            while self.open:
                if self._acks:
                    msg = self._acks.popleft()
                elif self._cmds:
                    msg = self._cmds.popleft()
                    self.commands_out += 1
                else:
                    self._queued.clear()
                    await self._queued.wait()
                    continue
                # write with response: the node's stack has taken each segment when it returns
                size = max(20, ctrl.max_write_without_response_size)
                for seg in segments(msg, size):
                    if not self.open:
                        return  # the session ended (a cancel may have been lost: _stop)
                    await client.write_gatt_char(ctrl, seg, response=True)
                    self.bytes_out += len(seg)
                self._progress.set()
        except Exception as e:
            self._error = e
            self._progress.set()

    async def run(self, client: BleakClient, idle_s: float, max_s: float, *,
                  hold: Hold | None = None, command_max_s: float = 0.0) -> bool:
        """Drain the node; True when it reports an empty backlog, False on a stall or timeout.

        hold: while it says the gateway wants the node (commands unanswered, or a hold time
        not over), the session goes on after the backlog is 0, up to `command_max_s` in all
        (a node that keeps commands unanswered cannot keep the gateway's radio for longer).
        """
        services = client.services
        chars: dict[str, Any] = {u: services.get_characteristic(u)
                                 for u in (DATA_UUID, CTRL_UUID, STATE_UUID)}
        missing = [u for u, c in chars.items() if c is None]
        if missing:
            raise FrameError("gatt", f"no Lantern characteristic {', '.join(missing)}")
        self.open = True
        writer = asyncio.create_task(self._writer(client, chars[CTRL_UUID]))
        try:
            await client.start_notify(chars[DATA_UUID], self._on_data)
            await client.start_notify(chars[STATE_UUID], self._on_state)
            self._start(state_nonce(await client.read_gatt_char(chars[STATE_UUID])))
            self.ready = True
            if self._on_ready is not None:
                self._on_ready(self)
            return await self._wait(idle_s, max_s, hold, command_max_s)
        finally:
            self.open = False
            self.ready = False
            await _stop(writer)

    async def _wait(self, idle_s: float, max_s: float, hold: Hold | None,
                    command_max_s: float) -> bool:
        started = time.monotonic()
        while True:
            if self._error is not None:
                raise self._error
            until, waiting = hold() if hold is not None else (0.0, 0)
            now = time.monotonic()
            held = waiting > 0 or until > now
            if self.backlog == 0 and self._idle() and not held:
                self.ended_by = "drained"
                return True
            limit = max(max_s, command_max_s) if held else max_s
            left = started + limit - now
            if left <= 0:
                self.ended_by = "command_limit" if held else "limit"
                log.info("%s: session limit %.0fs reached (backlog %s%s); yielding", self.name,
                         limit, self.backlog, ", commands pending" if held else "")
                return False
            # a stall is silence while something is owed: frames, a write, an answer
            owed = self.backlog != 0 or not self._idle() or waiting > 0
            wait = min(idle_s, left) if owed else min(idle_s, left, max(until - now, 0.01))
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), wait)
            except TimeoutError:
                if not owed or wait < idle_s:
                    continue  # a hold or a limit ran out, not a stall: said at the top
                self.ended_by = "stall"
                log.warning("%s: no progress for %.0fs (backlog %s, %d commands unanswered); "
                            "disconnecting", self.name, idle_s, self.backlog, waiting)
                return False


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait until it has ended, cancelling again if a cancel was lost.

    On CPython before 3.12, `asyncio.wait_for` returns the result instead of raising
    CancelledError when the awaited future completes in the same loop iteration as the
    cancel (gh-86296, bpo-42130). bumble's GATT write waits that way, so a session ending
    as a write response arrived left the writer running on, waiting on its queue forever,
    and the session with it: the node stayed connected to a gateway that drained it no more.
    """
    try:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
    except asyncio.CancelledError:
        task.cancel()
        raise
