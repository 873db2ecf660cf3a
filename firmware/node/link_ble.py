"""The node's BLE link: BTHome adverts with the latest values, and the Lantern GATT service.

On air, two adverts take turns: BTHome v2 (any receiver shows the values) and the Lantern
advert (service data under the Lantern UUID: backlog count and a 4-byte node tag), which tells
a gateway that this node has frames waiting. The gateway connects, subscribes, and writes an
authenticated start ACK carrying the connection's nonce (read from STATE) to start the drain;
DATA frames then go out as notifications, up to `window` in flight, until ACKs written back
name their sequence numbers. Frames stay in the outbox until then, so a drain cut by a lost
connection resumes with the next one. Messages are `type | body` as on the UART
(docs/protocol.md), without COBS or CRC (the BLE link layer checks its own), split into
segments that fit the ATT MTU.
"""

import asyncio
import hashlib
import os
import time

from . import bthome, cbor, cose, frame
from .ble import CONNECT, DISCONNECT, FLAG_NOTIFY, FLAG_READ, FLAG_WRITE, WRITE, Peripheral
from .outbox import _write_atomic
from .window import BAD_ACK, RTO_MAX_MS, Window, open_ack

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


SERVICE_UUID = "9f1c0001-6c61-6e74-6572-6e2d626c6501"
DATA_UUID = "9f1c0002-6c61-6e74-6572-6e2d626c6501"  # notify: node -> gateway messages
CTRL_UUID = "9f1c0003-6c61-6e74-6572-6e2d626c6501"  # write: gateway -> node messages
# read/notify: version, backlog (u16 LE), the connection's nonce (NONCE_LEN bytes)
STATE_UUID = "9f1c0004-6c61-6e74-6572-6e2d626c6501"
VERSION = const(1)

SEG_MORE = const(0x80)  # segment header: bit 7 = more segments follow, bits 0-6 = index
PACK_ITEMS = const(256)  # what decoding the node's own newest pack may build (node/cbor.py)
ACK_NONCE = const(3)  # in a start ACK: the nonce of the connection it starts a drain on
NONCE_LEN = const(8)
_CTRL_BUFFER = const(512)
_COUNTER_BLOCK = const(256)


def node_tag(node_id):
    """4 bytes that name the node in its Lantern advert: SHA-256(node id)[:4]."""
    return hashlib.sha256(node_id.encode()).digest()[:4]


def uuid_le(uuid):
    """A 128-bit UUID string as the 16 little-endian bytes adverts carry."""
    b = bytes.fromhex(uuid.replace("-", ""))
    return bytes(b[15 - i] for i in range(16))


def lantern_advert(tag, backlog):
    """Flags + service data for the Lantern UUID: version, backlog (u16 LE), node tag."""
    n = backlog if backlog < 0xFFFF else 0xFFFF
    data = uuid_le(SERVICE_UUID) + bytes((VERSION, n & 0xFF, n >> 8)) + tag
    return b"\x02\x01\x06" + bytes((len(data) + 1, 0x21)) + data


class Reassembler:
    """Joins the segments of one message; any gap or overflow drops the message."""

    def __init__(self, limit=frame.MAX_FRAME):
        self._buf = bytearray()
        self._next = 0
        self._limit = limit

    def feed(self, seg):
        """The complete message, None while more is to come; ValueError on a broken sequence."""
        if not seg:
            raise ValueError("empty segment")
        idx = seg[0] & 0x7F
        if idx != self._next:
            expected = self._next
            self._buf = bytearray()
            self._next = 0
            if idx:
                raise ValueError("segment %d, expected %d" % (idx, expected))
        self._buf.extend(seg[1:])
        if len(self._buf) > self._limit:
            self._buf = bytearray()
            self._next = 0
            raise ValueError("message over %d bytes" % self._limit)
        if seg[0] & SEG_MORE:
            self._next = idx + 1
            return None
        msg = bytes(self._buf)
        self._buf = bytearray()
        self._next = 0
        return msg


class Counter:
    """The BTHome encryption counter: never reused (a reused CCM nonce leaks plaintext).

    Reserved in blocks in a file replaced atomically, like the frame sequence; a reboot or a
    battery swap skips at most the rest of a block. A block is used only once its file is
    written: OSError (flash full) hands out nothing, and the next call tries again.
    """

    def __init__(self, path):
        self._path = path
        try:
            with open(path, "rb") as f:
                self._next = int(f.read())
        except (OSError, ValueError):
            self._next = 0
        self._reserved = self._next

    def next(self):
        if self._next >= self._reserved:
            limit = self._next + _COUNTER_BLOCK
            _write_atomic(self._path, b"%d" % limit)
            self._reserved = limit
        c = self._next
        self._next += 1
        return c


class BleLink(Window):
    def __init__(self, bt, node_id, key, outbox, clock, state_dir, cfg):
        super().__init__("ble", outbox, cfg.get("window", 8), cfg.get("rto_ms", 3000))
        # counters beside the window's (last_ack_ms: of the last start or ACK of a frame in
        # flight)
        self.bad_starts = 0  # authentic start ACKs not for this connection (replayed, stale)
        self.adverts = 0
        self.advert_failures = 0  # advert rounds skipped by an exception (e.g. flash full)
        self.connects = 0
        self.dropped_pullers = 0  # pulling centrals dropped for not acknowledging
        self._p = Peripheral(bt, cfg.get("mtu", 247), node_id)
        self._h_data, self._h_ctrl, self._h_state = self._p.register(SERVICE_UUID, (
            (DATA_UUID, FLAG_NOTIFY), (CTRL_UUID, FLAG_WRITE),
            (STATE_UUID, FLAG_READ | FLAG_NOTIFY)))
        self._p.set_buffer(self._h_ctrl, _CTRL_BUFFER)
        self._kid = node_id.encode()
        self._key = key
        self._clock = clock
        self._adv_us = cfg.get("adv_interval_ms", 100) * 1000
        self._rotate_ms = cfg.get("rotate_ms", 1000)
        self._pull_timeout = cfg.get("pull_timeout_ms", 10000)
        # longer than the longest legitimate gap between ACKs (a resend after RTO_MAX)
        self._ack_timeout = cfg.get("ack_timeout_ms", 60000)
        mode = cfg.get("bthome", "encrypted")
        if mode not in ("encrypted", "plain", "off"):
            raise ValueError("link.bthome: expected encrypted, plain or off, got %r" % mode)
        self._bthome = mode != "off"
        self._bindkey = bthome.derive_bindkey(key) if mode == "encrypted" else None
        self._counter = Counter(state_dir + "/bthome_counter")
        self._mac = self._p.mac()
        self._tag = node_tag(node_id)
        self._packet_id = 0
        self._latest = {}
        self._pull = None  # the connection draining the outbox
        self._pull_ms = 0  # ticks_ms of the puller's start or last ACK of a frame in flight
        self._nonce = b""  # the newest connection's nonce, in the STATE value centrals read
        self._restate = []  # connections to tell their nonce (their start ACK had another)
        self._since = {}  # connection handle -> ticks_ms when it connected
        self._rx = {}  # connection handle -> Reassembler
        self._state = None  # last STATE value written
        self._readv = asyncio.Event()
        self.commands = None  # node.commands.Commands, set by the node to answer diagnostics
        self._answers = []  # (connection, frame type, body, after), sent by _tx
        self._refresh_latest()

    def kick(self):
        """A new frame is in the outbox: its values go on air, and to the gateway if pulling."""
        self._refresh_latest()
        self._wake.set()

    def _refresh_latest(self):
        newest = self._outbox.newest()
        if newest is None:
            return
        try:
            payload = cose.mac0_parse(self._outbox.get(newest))[2]
            latest = {}
            for rec in cbor.loads(payload, PACK_ITEMS):  # the node's own pack
                if 0 in rec and 2 in rec:
                    latest[rec[0]] = rec[2]
        except (OSError, ValueError, TypeError, KeyError, MemoryError):
            return  # the adverts keep the values they had
        self._latest = latest

    async def run(self):
        asyncio.create_task(self._advertiser())
        asyncio.create_task(self._events())
        await self._tx()

    # -- adverts ------------------------------------------------------------------------

    def _bthome_adv(self):
        pid = self._packet_id
        self._packet_id = (pid + 1) & 0xFF
        if self._bindkey is None:
            return bthome.advert(bthome.encode(self._latest, pid))
        sd = bthome.encode(self._latest, pid, self._bindkey, self._mac, self._counter.next())
        return bthome.advert(sd)

    async def _advertiser(self):
        turn = 0
        while True:
            # the turn moves on first: a BTHome advert that fails every time (its counter
            # cannot be saved on a full flash) must not hold back the Lantern advert
            turn ^= 1
            try:
                self._advertise(turn)
            except Exception as e:  # noqa: BLE001 - a failed round must not end every advert
                # this round goes without an advert (one without a saved counter never goes)
                self.advert_failures += 1
                self._failed("advert", e)
            self._readv.clear()
            try:
                await asyncio.wait_for_ms(self._readv.wait(), self._rotate_ms)
            except asyncio.TimeoutError:
                pass

    def _advertise(self, turn):
        """One advert round: drop idle or hung centrals, then the next advert on air."""
        now = time.ticks_ms()
        for h, t in list(self._since.items()):
            if self._pull is not None and self._pull.handle == h:
                # nor one that stopped acknowledging mid-drain (its gateway hung): while
                # it holds the connection, no gateway can drain this node
                if len(self._outbox) and \
                        time.ticks_diff(now, self._pull_ms) > self._ack_timeout:
                    self.dropped_pullers += 1
                    self._p.disconnect(h)
                    del self._since[h]
            elif time.ticks_diff(now, t) > self._pull_timeout:
                # a central that never starts a drain must not keep the node to itself
                self._p.disconnect(h)
                del self._since[h]
        if turn and self._bthome and self._latest:
            adv = self._bthome_adv()
        else:
            adv = lantern_advert(self._tag, len(self._outbox))
        # one central at a time: while connected, adverts only carry values
        self._p.advertise(adv, self._adv_us, not self._p.connections)
        self.adverts += 1

    # -- connection events and writes ---------------------------------------------------

    async def _events(self):
        while True:
            for event in await self._p.events():
                try:
                    self._on_event(*event)
                except Exception as e:  # noqa: BLE001 - this task must outlive any write
                    self._rx_failed("event", e)

    def _on_event(self, kind, conn, detail):
        if kind == CONNECT:
            self.connects += 1
            self._rx[conn.handle] = Reassembler()
            self._since[conn.handle] = time.ticks_ms()
            # a start ACK must carry this: one recorded on another connection starts nothing
            conn.nonce = self._nonce = os.urandom(NONCE_LEN)
            self._p.write_local(self._h_state, self._state_value(self._nonce))
        elif kind == DISCONNECT:
            self._rx.pop(conn.handle, None)
            self._since.pop(conn.handle, None)
            if conn is self._pull:
                # unacknowledged frames stay in the outbox: the next drain resends them
                self._pull = None
                self._inflight = {}
            self._readv.set()
            self._wake.set()
        elif kind == WRITE and detail[0] == self._h_ctrl:
            self._on_segment(conn, detail[1])

    def _on_segment(self, conn, seg):
        rx = self._rx.get(conn.handle)
        if rx is None:
            return
        try:
            msg = rx.feed(seg)
        except ValueError:
            self.rx_errors += 1
            return
        if msg is None:
            return
        if len(msg) >= 1 and msg[0] == frame.ACK:
            self._on_ack(conn, msg[1:])
        elif len(msg) >= 1 and msg[0] == frame.COMMAND and self.commands is not None:
            for ftype, body, after in self.commands.handle(msg[1:]):
                self._answers.append((conn, ftype, body, after))
                if ftype == frame.REPLY and conn.handle in self._since:
                    # a REPLY answers only a command that verified and passed the counter
                    # check (commands.py): a key holder (a diagnostic tool) may stay
                    self._since[conn.handle] = time.ticks_ms()
            self._wake.set()
        else:
            self.rx_errors += 1

    def _on_ack(self, conn, body):
        try:
            seqs, gw_ms, ack = open_ack(body, self._kid, self._key)
            nonce = ack.get(ACK_NONCE)
        except BAD_ACK:
            self.bad_acks += 1
            return
        now = time.ticks_ms()
        if self._pull is not conn:
            if nonce is not None and nonce == conn.nonce:
                # only the gateway holds the key, and the nonce is this connection's: the
                # gateway wrote this start here, now (not a recording from elsewhere)
                self._pull = conn
                self._pull_ms = now
                self.last_ack_ms = now
                self._inflight = {}
                self._state = None
            elif not seqs:
                # replayed, or its gateway read a stale nonce: tell it this connection's
                self.bad_starts += 1
                if conn not in self._restate:
                    self._restate.append(conn)
                self._wake.set()
                return
        if self._acked(seqs):
            # only news keeps a puller: a replayed ACK names no frame in flight
            if conn is self._pull:
                self._pull_ms = now
            self.last_ack_ms = now
            if isinstance(gw_ms, int):
                self._clock.set_ms(gw_ms)
        self._wake.set()

    # -- sending ------------------------------------------------------------------------

    async def _send(self, conn, ftype, body):
        """One message as notifications of at most MTU - 3 bytes; False if the link dropped."""
        msg = bytes((ftype,)) + body
        size = conn.mtu - 4  # 3 bytes of ATT header, 1 of segment header
        off = 0
        idx = 0
        while True:
            chunk = msg[off : off + size]
            off += size
            more = off < len(msg)
            seg = bytes((idx | (SEG_MORE if more else 0),)) + chunk
            if not await self._p.notify(conn, self._h_data, seg):
                return False
            if not more:
                return True
            idx += 1

    def _state_value(self, nonce):
        n = len(self._outbox)
        n = n if n < 0xFFFF else 0xFFFF
        return bytes((VERSION, n & 0xFF, n >> 8)) + nonce

    async def _publish_state(self, conn):
        state = self._state_value(self._nonce)
        if state != self._state:
            self._p.write_local(self._h_state, state)
            # a notification goes to one connection: it carries that connection's nonce
            if conn is None or await self._p.notify(
                    conn, self._h_state, self._state_value(conn.nonce)):
                self._state = state

    async def _tx_round(self):
        """Answers, restated nonces, due frames and the STATE value; ms until the next is due."""
        # diagnostic answers first, from this task only, so messages never interleave
        while self._answers:
            to, ftype, body, after = self._answers.pop(0)
            if await self._send(to, ftype, body) and after:
                after()
        while self._restate:
            to = self._restate.pop(0)
            await self._p.notify(to, self._h_state, self._state_value(to.nonce))
        conn = self._pull
        if conn is not None and conn.connected:
            wait = await self._send_due(conn)
            await self._publish_state(conn)
            return wait
        await self._publish_state(None)
        return RTO_MAX_MS

    async def _transmit(self, conn, data):
        return await self._send(conn, frame.DATA, data)
