"""The send window both node links share: frames in flight, resends, authenticated ACKs.

Up to `window` frames of the outbox are in flight; each is resent with exponential backoff and
jitter until an ACK names its sequence number. Only the gateway (holding the node key) can make
the node forget a frame, and only a fresh ACK for a frame in flight may set the clock: one that
arrives within TIME_FRESH_MS of that frame's first transmission (docs/time.md). A link
subclasses `Window` and keeps only its transport: `_transmit` puts one DATA frame on the wire,
`_tx_round` says what goes out in one round (calling `_send_due` for the frames).
"""

import asyncio
import random
import time

from . import cbor, cose
from .outbox import _write_atomic

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_ACK_SEQS = const(1)
_ACK_TIME = const(2)
# An ACK is {1: [up to 32 seqs], 2: time} (3: a nonce on BLE): what its decoding may build.
_ACK_ITEMS = const(64)
RTO_MAX_MS = const(30000)
# The gateway remembers 64 sequence numbers below the highest it took (docs/protocol.md).
# Frames in flight never span more, or an old one whose ACK was lost would come back
# below the window, be refused as a replay and stay in the outbox, and its slot, forever.
_REPLAY_WINDOW = const(64)
# An ACK's time is taken only if it arrives at most this long after the first transmission of
# a frame it names: the gateway wrote it after that frame reached it, so the time is at most
# this old. A relay that holds an authentic ACK back (and lets the resends through) cannot
# hand the node an older one; a late ACK still removes its frames. Not tighter: a gateway
# holds a slow node's frame up to its commit window before the ACK ([queue] commit_window_ms,
# 8 s, at most 10 s), and a first transmission may be lost (the resend follows 1 s later).
TIME_FRESH_MS = const(15000)
# what an ACK that is not authentic or not well formed raises out of open_ack
BAD_ACK = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def open_ack(body, kid, key):
    """(seqs, gateway time, the ACK's map) of an authentic ACK for `kid`; BAD_ACK otherwise."""
    # the envelope by position and the MAC first: no decoder sees a forged payload
    protected, ack_kid, _, payload, tag = cose.mac0_peek(body)
    if ack_kid != kid:
        raise cose.CoseError("ack for another node")
    cose.mac0_check(key, protected, payload, tag)
    ack = cbor.loads(payload, _ACK_ITEMS)
    seqs = ack[_ACK_SEQS]
    gw_ms = ack.get(_ACK_TIME)
    # Check the shape before acting on it (only a buggy gateway sends another).
    if not isinstance(seqs, list) or [s for s in seqs if not isinstance(s, int)]:
        raise TypeError("ack seqs must be a list of ints")
    return seqs, gw_ms, ack


class Window:
    """The in-flight map over an outbox, the send task, and the failure log of a link's tasks.

    A link defines `async _tx_round()` (what one round sends; ms until the next frame is due)
    and `async _transmit(conn, data)` (one DATA frame to conn; False if the link dropped).
    """

    def __init__(self, name, outbox, window, rto_ms):
        self._name = name  # "uart", "ble": in what the tasks print
        self._outbox = outbox
        self._window = window
        self._rto = rto_ms
        # seq -> (due ticks_ms, attempts, order of its latest send, ticks_ms of its first send,
        # None once that is over TIME_FRESH_MS ago)
        self._inflight = {}
        self._sends = 0  # transmissions so far: the order frames went out on the link
        self._evicted = outbox.evicted  # the outbox's drop count when _inflight was last pruned
        self._wake = asyncio.Event()
        self._failed_once = {}  # task name -> True once its first exception was printed
        # what both links count, on the link itself (one object less per link); each link adds
        # its transport's counters
        self.stats = self
        self.sent = 0
        self.retransmits = 0
        self.acked = 0
        self.rx_errors = 0
        self.bad_acks = 0
        self.rx_failures = 0  # also in rx_errors: exceptions no handler expected (a bug, OOM)
        self.tx_failures = 0  # send rounds an exception cut short (retried after rto_ms)
        self.last_ack_ms = None  # ticks_ms of the last authentic ACK (diagnostics)
        self.late_acks = 0  # ACKs of frames in flight that came too late to give the time
        # the newest sequence number an ACK took out of the outbox this boot (node/hold.py)
        self.acked_top = -1
        # The newest frame an earlier boot left in the outbox: the hold may have sealed it just
        # before a reset, and its ACK, which can come before the hold is loaded again, is then
        # the only trace that the seal went out. Its ACK is noted on flash beside the outbox's
        # directory (`<outbox>.acked`, read by node/hold.py; one small write, in a boot that
        # starts with frames waiting), a trace a second reset keeps.
        self._carried = outbox.newest() if hasattr(outbox, "dir") else None
        self.on_late = None  # called after a late ACK (node/hold.py: ask for the time again)

    def kick(self):
        """A new frame is in the outbox."""
        self._wake.set()

    def _failed(self, task, e, where=""):
        """An exception a task survived: printed the first time for each task, then counted."""
        if task not in self._failed_once:
            self._failed_once[task] = True
            print("%s %s%s failed: %r (later ones only counted)" % (self._name, task, where, e))

    def _rx_failed(self, task, e, where=""):
        """An exception no receive handler expected (a bug, OOM): counted, printed once."""
        self.rx_errors += 1
        self.rx_failures += 1
        self._failed(task, e, where)

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
            except Exception as e:  # noqa: BLE001 - e.g. a write error, a frame unreadable
                # the frames stay in the outbox: the next round, after a pause, tries again
                self.tx_failures += 1
                self._failed("tx", e)
                await asyncio.sleep_ms(self._rto)
                continue
            if self._wake.is_set():
                continue  # an ACK, a frame or a command came while frames were going out
            try:
                await asyncio.wait_for_ms(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _send_due(self, conn):
        """The frames in the window that are due, to `conn`; ms until the next one is."""
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
        older = False  # an older frame is in flight, its timer still running
        for seq in seqs:
            if seq - seqs[0] >= _REPLAY_WINDOW:
                break  # the gateway would take the oldest, resent later, for a replay
            e = self._inflight.get(seq)
            due, attempts = (now, 0) if e is None else (e[0], e[1])
            left = time.ticks_diff(due, now)
            if held:
                continue
            if left > 0 and attempts > 1:
                # this one timed out before and waits to be resent: nothing newer goes
                # first, so the gateway takes each node's frames in order
                held = True
            if left <= 0 and attempts and older:
                # a resend waits for the older frames' timers (counted in `wait`): the
                # backoff's jitter must not resend a newer frame before an older one
                continue
            if left > 0 and attempts:
                older = True
            if left <= 0:
                if seq not in self._outbox:
                    self._inflight.pop(seq, None)
                    continue  # acknowledged while the previous one was going out
                if not await self._transmit(conn, self._outbox.get(seq)):
                    break
                self.sent += 1
                if attempts:
                    self.retransmits += 1
                left = self._backoff(attempts)
                self._sends += 1
                first = now if e is None else e[3]
                if first is not None and time.ticks_diff(now, first) > TIME_FRESH_MS:
                    # stale for good, seen at each resend (at most RTO_MAX_MS and its jitter
                    # apart): long before the tick counter could wrap back to a young age
                    first = None
                self._inflight[seq] = (time.ticks_add(now, left), attempts + 1, self._sends, first)
            if left < wait:
                wait = left
        return wait

    def _acked(self, seqs):
        """Forget the frames an authentic ACK names; True if it is news: it names a frame in
        flight and came within TIME_FRESH_MS of that frame's first send (its time, if any,
        is then at most that old)."""
        named = fresh = False
        last = 0  # the latest send an ACK names
        now = time.ticks_ms()
        for seq in seqs:
            # an authentic ACK removes what it names, whoever writes it
            e = self._inflight.pop(seq, None)
            if e is not None:
                named = True
                # (a difference below 0 is the counter wrapped: never fresh)
                if e[3] is not None and 0 <= time.ticks_diff(now, e[3]) <= TIME_FRESH_MS:
                    fresh = True
                if e[2] > last:
                    last = e[2]
            if seq == self._carried:
                self._carried = None
                try:  # before the frame goes: a reset between leaves both, never neither
                    _write_atomic(self._outbox.dir + ".acked", b"%d" % seq)
                except OSError as err:  # (flash full: a seal it was may go twice, printed)
                    self._failed("ack note", err)
            if self._outbox.remove(seq):
                self.acked += 1
                if seq > self.acked_top:
                    self.acked_top = seq
        if named and not fresh:
            self.late_acks += 1
            if self.late_acks == 1:
                print("%s: an ACK came over %d ms after its frame first went out: no time "
                      "taken from it (later ones only counted)" % (self._name, TIME_FRESH_MS))
            if self.on_late is not None:
                self.on_late()
        if last:
            # the link keeps order: a frame that went out before one the gateway has taken,
            # and is not acknowledged, was lost on the way (or refused). It goes again now,
            # before anything newer, so the gateway still takes the node's frames in order
            # (after a gateway restart, the frames sent while its port was closed)
            for seq in [s for s, e in self._inflight.items() if e[2] < last]:
                self._inflight[seq] = (now,) + self._inflight[seq][1:]
        return fresh
