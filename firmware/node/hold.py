"""The hold: samples taken before the node knows the time, unsealed until it does (docs/time.md).

Loaded by node/untimed.py only while it has work, and given back once it is empty.

A pack is sealed (MAC, sequence number) with its absolute time, so a node whose clock was
never set (an ESP32 after a power cut counts from 2000-01-01) seals nothing it samples:
each sample waits on flash with the clock's reading at the time, and is sealed once the
gateway's time is known, shifted by what setting the clock moved it. To get that time the
node sends a *time request*: a pack of one record, `time.q` = 1, with base time 0 (SenML
"now", RFC 8428 §4.5.3), whenever nothing else is waiting for an ACK; an ACK's key 2 sets
the clock (node/window.py).

What can no longer be timed is sealed with a `time.q` flag instead of a wrong time:
- RELATIVE: the hold is full (`max_untimed`): the oldest sample goes with base time -age,
  relative to when the gateway receives the pack (RFC 8428 §4.5.3): right if it goes at once.
- BEFORE: sampled in an earlier run of the board's clock (a power cut since): its time is when
  this boot began, and the reading is older by an unknown span; BEFORE | RELATIVE while this
  boot's start is not known either: base time -uptime, the same bound relative to the receipt.
"""

import asyncio
import os
import time

from . import cbor
from .outbox import _makedirs, _names, _write_atomic

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


TIME_Q = "time.q"
RELATIVE = const(1)
BEFORE = const(2)
HOLD_MAX = const(256)  # samples held by default (node.json max_untimed)
_BATCH = const(8)  # packs sealed between yields to the loop (the link, the watchdog)
_ITEMS = const(256)
# resets through which the board's clock runs on (ESP32: the RTC counts through deep sleep and
# a soft reset; a power cut, a brown-out or the reset pin start it again at the epoch)
_CONTINUOUS = ("deep_sleep", "soft")


class Hold:
    """The held samples: files `<n>` holding CBOR [run, clock s, values], oldest first (and
    the records of their seal, `_seal_oldest`).

    `done` is called once the clock is known and nothing is held any more."""

    def __init__(self, node, done):
        self.node = node
        self._done = done
        self.dir = node.cfg["state_dir"] + "/untimed"
        self._run_path = self.dir + "/run"
        self.limit = node.cfg.get("max_untimed", HOLD_MAX)
        _makedirs(self.dir)
        first = last = -1
        for name in _names(self.dir):
            if name.isdigit():
                n = int(name)
                if first < 0 or n < first:
                    first = n
                if n > last:
                    last = n
            elif name.endswith(".tmp"):  # a write a power cut interrupted: never renamed
                os.remove(self.dir + "/" + name)
        self._first = first if first >= 0 else 0
        self._next = last + 1
        run, shift = self._read_run()
        boot = getattr(node, "boot", None) or {}
        if boot.get("reset") in _CONTINUOUS:
            self.run, self.shift_ms = run, shift  # the same run of the clock: its shift holds
            self._run_saved = True
        else:
            self.run, self.shift_ms = run + 1, None
            self._run_saved = False
        clock = node.clock
        # when this boot began, in the clock's scale; once known, the bound for BEFORE
        self._boot_ms = clock.now_ms() - self._up_ms()
        self._boot_abs = self._boot_ms if clock.synced or clock.known else None
        first = getattr(clock, "first_shift_ms", None)
        if first is not None and self.shift_ms is None:
            self.shift_ms = first  # set in this boot before the hold loaded: as _on_set does
        clock.on_set = self._on_set
        if node.link is not None:
            node.link.on_late = self._on_late
        # the newest frame an ACK took out of the outbox in an earlier boot, as node/window.py
        # noted it (-1: none)
        self._noted = -1
        box_dir = getattr(node.outbox, "dir", None)
        if box_dir:
            try:
                with open(box_dir + ".acked") as f:
                    self._noted = int(f.read())
            except (OSError, ValueError):
                pass  # (none yet)
        self.requests = 0  # time requests sealed (diagnostics)
        self.flagged = 0  # samples sealed with a time.q flag
        if len(self):
            self._recover()

    def __len__(self):
        return self._next - self._first

    def _up_ms(self):
        """This boot's uptime, or less: ticks_diff wraps past half the tick period (6.2 days
        on an ESP32); the mask keeps it at or below the truth, so a bound made of it holds."""
        return time.ticks_diff(time.ticks_ms(), self.node.boot_ms) & time.ticks_add(0, -1)

    def _read_run(self):
        try:
            with open(self._run_path) as f:
                parts = f.read().split()
            return int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
        except (OSError, ValueError, IndexError):
            return 0, None

    def _save_run(self):
        data = b"%d" % self.run if self.shift_ms is None else b"%d %d" % (self.run, self.shift_ms)
        _write_atomic(self._run_path, data)
        self._run_saved = True

    def _on_set(self, shift_ms):
        """The clock was set for the first time this boot (from the link's task)."""
        self._boot_abs = self._boot_ms + shift_ms
        if self.shift_ms is None:  # (known already: the clock was set earlier in this run)
            self.shift_ms = shift_ms
        if not len(self):
            self._done()
            return
        try:
            self._save_run()  # a deep sleep before they are sealed must not lose it
        except OSError as e:
            print("untimed: clock shift not saved: %r" % (e,))
        # sealed now, not at the next sample (an interval may be half an hour)
        asyncio.create_task(self.flush())

    def _on_late(self):
        """An ACK came too late to give the time (node/window.py): ask again, now."""
        clock = self.node.clock
        if not (clock.synced or clock.known):
            asyncio.create_task(self._ask())

    async def _ask(self):
        seq = self.request()
        if seq is not None:
            print("sample seq=%d readings=1 outbox=%d (time request: the last ACK came late)" % (
                seq, len(self.node.outbox)))
            self.node.link.kick()

    async def take(self, now, values):
        """Seal this sample (its seq), or hold it while the clock is not known (None)."""
        node = self.node
        clock = node.clock
        if clock.synced or clock.known:
            await self.flush()  # the held ones first: the packs keep their sampling order
            return node.seal(now, values)
        self.hold(now, values)
        seq = self.request()
        if seq is not None:
            # a sealed pack like any other (harnesses count them): one reading, time.q
            print("sample seq=%d readings=1 outbox=%d (time request: clock not set, %d held)" % (
                seq, len(node.outbox), len(self)))
        else:
            print("sample held: clock not set (%d held, outbox %d)" % (len(self), len(node.outbox)))
        return None

    def hold(self, now, values):
        """Keep one sample until the time is known; the oldest goes RELATIVE if full."""
        if not self._run_saved:
            self._save_run()
        while len(self) >= self.limit:
            self._seal_oldest(RELATIVE)
        _write_atomic("%s/%d" % (self.dir, self._next), cbor.dumps([self.run, now, values]))
        self._next += 1

    def request(self):
        """Seal a time request (a pack without time) if nothing else can bring an ACK."""
        node = self.node
        if len(node.outbox):
            return None
        self.requests += 1
        return node.seal(0, {TIME_Q: RELATIVE})

    async def flush(self):
        """Seal every held sample with its time (or a flag); the clock is known.

        Runs from the clock's first set (a task) and from a cycle, which waits for it to end
        before it seals its own sample: each call seals the oldest, so they share the work
        and the packs keep their sampling order."""
        while len(self):
            for _ in range(_BATCH):
                if not len(self):
                    break
                self._seal_oldest(None)
            self.node.beat_ms = time.ticks_ms()
            if self.node.link:
                self.node.link.kick()
            await asyncio.sleep_ms(0)
        clock = self.node.clock
        if clock.synced or clock.known:
            self._done()

    def _recover(self):
        """Settle the seal a power cut interrupted: sealed already (its file goes), or not.

        Runs before this boot seals anything: a pack newer than the record's `after` (still in
        the outbox, or acknowledged: in this boot, or in an earlier one that node/window.py
        noted) can only be that seal's."""
        rec = self._read(self._first)
        if rec is None or not _sealing(rec):
            return
        at, values, after = rec
        if self._top(self.node) > after:
            print("untimed: held sample %d was sealed before a power cut" % self._first)
            self._drop_first()
        else:
            # not sealed: its time (decided before the cut, in the run it was taken) stays
            _write_atomic(self._path(self._first), cbor.dumps([at, values]))

    def _top(self, node):
        """The newest sequence number known handed out: waiting in the outbox, or taken out of
        it by an ACK (this boot's, or an earlier boot's node/window.py noted)."""
        top = getattr(node.link, "acked_top", -1)
        if self._noted > top:
            top = self._noted
        newest = node.outbox.newest()
        return newest if newest is not None and newest > top else top

    def _path(self, n):
        return "%s/%d" % (self.dir, n)

    def _read(self, n):
        """The record of held sample n, or None (unreadable: counted, printed)."""
        try:
            with open(self._path(n), "rb") as f:
                rec = cbor.loads(f.read(), _ITEMS)
            if not (isinstance(rec, list) and 2 <= len(rec) <= 3
                    and dict in (type(rec[1]), type(rec[-1]))):
                raise ValueError("not a held record")
            return rec
        except (OSError, ValueError, TypeError) as e:
            # unreadable (a flash error): counted and skipped, never a stuck hold
            print("untimed: held sample %d unreadable: %r" % (n, e))
            self.node.seal_errors += 1
            return None

    def _seal_oldest(self, how):
        """Seal the oldest held sample exactly once, whenever the power fails.

        Its file goes through three records: [run, clock s, values] (held), [at, values]
        (timed) and [at, values, after] (being sealed: no sequence number handed out before the
        seal is above `after`). The last is written before the outbox takes the pack, so a
        boot finds either the pack or no pack newer than `after` (`_recover`)."""
        rec = self._read(self._first)
        if rec is not None and len(rec) == 3 and not _sealing(rec):
            run, t, values = rec
            flag = 0
            if run == self.run and how == RELATIVE:
                at = t - self.node.clock.now()  # seconds before "now" (negative)
                if at > 0:
                    at = 0
                flag = RELATIVE
            elif run == self.run and self.shift_ms is not None:
                at = t + self.shift_ms // 1000  # (within a second)
            elif self._boot_abs is not None:
                at = self._boot_abs // 1000  # older than this boot, by an unknown span
                flag = BEFORE
            else:
                # an earlier run of the clock (its reading means nothing now), and this boot's
                # start not known either: older than this boot, which began at least its
                # uptime before the gateway's receipt
                at = -(self._up_ms() // 1000)
                flag = BEFORE | RELATIVE
            if flag:
                values[TIME_Q] = flag
        elif rec is not None:
            at, values = rec[0], rec[1]  # timed in an earlier attempt
        if rec is not None:
            node = self.node
            _write_atomic(self._path(self._first), cbor.dumps([at, values, self._top(node)]))
            seq = node.seal(at, values)
            if TIME_Q in values:
                self.flagged += 1
            print("sample seq=%d readings=%d outbox=%d (held)" % (
                seq, len(values), len(self.node.outbox)))
        self._drop_first()

    def _drop_first(self):
        try:
            os.remove(self._path(self._first))
        except OSError:
            pass
        self._first += 1
        if not len(self):
            self._first = self._next = 0


def _sealing(rec):
    """A record written just before its seal: [at, values, after] (held: [run, t, values])."""
    return len(rec) == 3 and isinstance(rec[1], dict)
