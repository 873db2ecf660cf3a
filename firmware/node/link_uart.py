"""The node's UART link: DATA frames out of the outbox, authenticated ACKs back.

Up to `window` frames are in flight; each is retransmitted with exponential backoff and
jitter until an ACK names its sequence number. Only the gateway (holding the node key) can
make the node forget a frame, and only an ACK for a frame in flight may set the clock.
"""

import asyncio
import random
import time

from . import cbor, cose, frame

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


ACK_SEQS = const(1)
ACK_TIME = const(2)
# An ACK is {1: [up to 32 seqs], 2: time} (3: a nonce on BLE): what its decoding may build.
ACK_ITEMS = const(64)
RTO_MAX_MS = const(30000)
# The gateway remembers 64 sequence numbers below the highest it took (docs/protocol.md).
# Frames in flight never span more, or an old one whose ACK was lost would come back
# below the window, be refused as a replay and stay in the outbox, and its slot, forever.
REPLAY_WINDOW = const(64)


class LinkStats:
    def __init__(self):
        self.sent = 0
        self.retransmits = 0
        self.acked = 0
        self.rx_errors = 0
        self.bad_acks = 0
        self.crc_errors = 0  # also counted in rx_errors: the line-noise share of them
        self.rx_failures = 0  # also in rx_errors: exceptions no handler expected (a bug, OOM)
        self.tx_failures = 0  # send rounds an exception cut short (retried after rto_ms)
        self.last_ack_ms = None  # ticks_ms of the last authentic ACK (diagnostics)


class UartLink:
    def __init__(self, stream, node_id, key, outbox, clock, window=4, rto_ms=1000):
        self._reader = asyncio.StreamReader(stream)
        self._writer = asyncio.StreamWriter(stream, {})
        self._kid = node_id.encode()
        self._key = key
        self._outbox = outbox
        self._clock = clock
        self._window = window
        self._rto = rto_ms
        self._inflight = {}  # seq -> (due ticks_ms, attempts)
        self._evicted = outbox.evicted  # the outbox's drop count when _inflight was last pruned
        self._wake = asyncio.Event()
        self.stats = LinkStats()
        self.commands = None  # node.commands.Commands, set by the node to answer diagnostics
        self._answers = []  # (frame type, body, after) from commands, sent by _tx
        self._logged = False  # the first unexpected exception in _rx is printed, later counted
        self._tx_logged = False  # the same for _tx

    def kick(self):
        """A new frame is in the outbox."""
        self._wake.set()

    async def run(self):
        asyncio.create_task(self._rx())
        await self._tx()

    def _backoff(self, attempts):
        rto = self._rto << min(attempts, 5)
        if rto > RTO_MAX_MS:
            rto = RTO_MAX_MS
        return rto + random.getrandbits(8) * rto // 1024

    async def _tx(self):
        while True:
            # cleared before the work, not after: an ACK, a new frame or a command arriving
            # while a frame goes out sets it again, and is seen before this task waits
            self._wake.clear()
            try:
                wait = await self._tx_round()
            except Exception as e:  # noqa: BLE001 - e.g. a UART write error, a frame unreadable
                # the frames stay in the outbox: the next round, after a pause, tries again
                self.stats.tx_failures += 1
                if not self._tx_logged:
                    self._tx_logged = True
                    print("uart tx failed: %r (later ones only counted)" % (e,))
                await asyncio.sleep_ms(self._rto)
                continue
            if self._wake.is_set():
                continue  # an ACK, a frame or a command came while frames were going out
            try:
                await asyncio.wait_for_ms(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _tx_round(self):
        """Answers, then the frames that are due; ms until the next one is."""
        # diagnostic answers go out first and from this task only, so frames never interleave
        while self._answers:
            ftype, body, after = self._answers.pop(0)
            self._writer.write(frame.encode(ftype, body))
            await self._writer.drain()
            if after:
                after()
        now = time.ticks_ms()
        wait = RTO_MAX_MS
        seqs = self._outbox.oldest(self._window)
        if self._outbox.evicted != self._evicted:
            # frames a full outbox dropped may have been in flight: forget them too, or a
            # long gateway outage grows this map until the heap runs out (frames leave
            # the outbox oldest first, and numbers never repeat)
            self._evicted = self._outbox.evicted
            first = seqs[0] if seqs else None
            for seq in [s for s in self._inflight if first is None or s < first]:
                del self._inflight[seq]
        held = False
        for seq in seqs:
            if seq - seqs[0] >= REPLAY_WINDOW:
                break  # the gateway would take the oldest, resent later, for a replay
            due, attempts = self._inflight.get(seq, (now, 0))
            left = time.ticks_diff(due, now)
            if held:
                continue
            if left > 0 and attempts > 1:
                # this one timed out before and waits to be resent: nothing newer goes
                # first, so the gateway takes each node's frames in order
                held = True
            if left <= 0:
                if seq not in self._outbox:
                    self._inflight.pop(seq, None)
                    continue  # acknowledged while the previous one was going out
                data = self._outbox.get(seq)
                self._writer.write(frame.encode(frame.DATA, data))
                await self._writer.drain()
                self.stats.sent += 1
                if attempts:
                    self.stats.retransmits += 1
                left = self._backoff(attempts)
                self._inflight[seq] = (time.ticks_add(now, left), attempts + 1)
            if left < wait:
                wait = left
        return wait

    async def _rx(self):
        deframer = frame.Deframer()
        while True:
            try:
                data = await self._reader.read(256)
            except Exception as e:  # noqa: BLE001 - e.g. a UART driver error: keep listening
                self._failed("read", e)
                await asyncio.sleep_ms(100)
                continue
            if not data:
                await asyncio.sleep_ms(20)
                continue
            try:
                for chunk in deframer.feed(data):
                    # one frame at a time: whatever one does, the frames after it are heard
                    try:
                        self._on_chunk(chunk)
                    except Exception as e:  # noqa: BLE001 - this task must outlive any frame
                        self._failed("frame", e)
            except Exception as e:  # noqa: BLE001 - the deframer itself, e.g. out of heap
                self._failed("deframer", e)

    def _failed(self, where, e):
        """An exception no handler expected: counted, printed once, survived."""
        self.stats.rx_errors += 1
        self.stats.rx_failures += 1
        if not self._logged:
            self._logged = True
            print("uart rx %s failed: %r (later ones only counted)" % (where, e))

    def _on_chunk(self, chunk):
        if chunk is None:
            self.stats.rx_errors += 1
            return
        try:
            ftype, body = frame.decode(chunk)
        except frame.FrameError as e:
            self.stats.rx_errors += 1
            if e.kind == "crc":
                self.stats.crc_errors += 1
            return
        if ftype == frame.ACK:
            self._on_ack(body)
        elif ftype == frame.COMMAND and self.commands is not None:
            self._answers.extend(self.commands.handle(body))
            self._wake.set()

    def _on_ack(self, body):
        try:
            # the envelope by position and the MAC first: no decoder sees a forged payload
            protected, kid, _, payload, tag = cose.mac0_peek(body)
            if kid != self._kid:
                raise cose.CoseError("ack for another node")
            cose.mac0_check(self._key, protected, payload, tag)
            ack = cbor.loads(payload, ACK_ITEMS)
            seqs = ack[ACK_SEQS]
            gw_ms = ack.get(ACK_TIME)
            # Check the shape before acting on it (only a buggy gateway sends another).
            if not isinstance(seqs, list) or [s for s in seqs if not isinstance(s, int)]:
                raise TypeError("ack seqs must be a list of ints")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            self.stats.bad_acks += 1
            return
        self.stats.last_ack_ms = time.ticks_ms()
        fresh = False
        for seq in seqs:
            if self._inflight.pop(seq, None) is not None:
                fresh = True
            if self._outbox.remove(seq):
                self.stats.acked += 1
        if fresh and isinstance(gw_ms, int):
            self._clock.set_ms(gw_ms)
        self._wake.set()
