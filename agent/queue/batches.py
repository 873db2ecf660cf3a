"""The forward stage on the store's thread: whole frames, resolved, in batches for sinks.

Every function runs on the store's thread (store.py hands them to its executor; forward.py
asks for the batches, one forwarder per sink). A frame is resolved (resolve.py) the first time
anything needs it — a sink's batch, or the local API showing the history — and enters the
history (history.py) then, in frame order, so `history.upto` says how far it got. A pack that
does not resolve moves to the dead letters, and is reported to the event loop (`reports`) to be
counted and logged there. Frames leave the queue once every sink has them and the history has
them too.

What this side needs of the store is named in `QueueAccess` — the connection, a
transaction, the history, the disk cap and the tail (frames on the intake log, newer than
every frame in SQLite: intake.py) — and nothing else of it is used here. The tail's frames
are read like the queue's rows; delivered or buried, they leave it as they leave SQLite.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import FrameError
from ..timesync import TimeSync, relative_records
from .diskcap import DiskCap
from .history import History
from .intake import Tail
from .resolve import PACK, Batch, Cache, Resolved, dumps, resolve

log = logging.getLogger("lantern.forward")

BATCH_ROWS = 32  # frames read per query while filling a batch
CATCH_UP_MAX = 5000  # frames resolved into the history per API read, at most


class QueueAccess(Protocol):
    """What the forward stage needs of the store (store.py's `Store` is one)."""

    history: History
    cap: DiskCap
    tail: Tail

    @property
    def db(self) -> sqlite3.Connection: ...

    def transaction(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = True
                    ) -> None:
        """fn in one transaction (durable=False: see Store.transaction)."""


class Batches:
    def __init__(self, queue: QueueAccess) -> None:
        self.queue = queue
        self.cache = Cache()
        self._found_dead: list[tuple[int, str, int, float, bytes, FrameError]] = []
        self._bugs = 0  # frames resolution failed on with anything but a FrameError
        # dead letters found, for the event loop: (node, seq, kind, detail)
        self.reports: collections.deque[tuple[str, int, str, str]] = collections.deque()
        # the gateway's clock (agent/timesync.py): anchors relative SenML times at a frame's
        # receipt, corrected by the step the clock took if it was unsynchronised then
        self.clock: TimeSync | None = None

    def resolved(self, row: tuple[Any, ...]) -> Resolved | None:
        """A frames row as SenML-JSON (cached); None if its pack is a dead letter."""
        fid, node, seq, received_at, _, fmt, body = row
        hit = self.cache.get(fid)
        if hit is not None:
            return hit
        history = self.queue.history
        try:
            records, text = resolve(node, seq, fmt, body)
            provisional = False
            if self.clock is not None and relative_records(records):  # docs/time.md
                records = self.clock.fix_times(records, received_at)
                text = dumps(records)[1:-1]
                # anchored at a receipt the clock may still correct: not kept in the cache
                provisional = not self.clock.synchronized
            res = Resolved(fid, node, seq, received_at, [r["id"] for r in records], text)
            if fid > history.upto:
                history.add(fid, node, received_at, records, body if fmt == PACK else None)
        except Exception as e:
            # One frame must never stop the way out: whatever resolving it raises, it becomes
            # a dead letter (kept, with the reason) and the frames after it go on. Anything
            # but a FrameError is a bug of ours: its traceback is logged once.
            if isinstance(e, FrameError):
                err = e
            else:
                if not self._bugs:
                    log.error("frame %d (node %s, seq %d) could not be resolved: %r; kept as a "
                              "dead letter. This is a bug: please report it with this "
                              "traceback", fid, node, seq, e, exc_info=True)
                self._bugs += 1
                err = FrameError("internal", f"{type(e).__name__}: {e}")
            self._found_dead.append((fid, node, seq, received_at, body, err))
            if fid > history.upto:
                history.skip(fid)
            return None
        if not provisional:
            self.cache.put(res)
        return res

    def _frames(self, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.queue.db.execute(
            "SELECT id, node, seq, received_at, readings, format, body FROM frames"
            " WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        if len(rows) < limit and self.queue.tail.rows:
            rows += self.queue.tail.after(rows[-1][0] if rows else after_id, limit - len(rows))
        return rows

    def catch_up(self, upto: int | None, budget: int = CATCH_UP_MAX) -> None:
        """Resolve frames the history does not have yet (in order), up to `upto`."""
        history = self.queue.history
        while budget > 0 and (upto is None or history.upto < upto):
            start = history.upto
            rows = [r for r in self._frames(start, min(budget, 256))
                    if upto is None or r[0] <= upto]
            for row in rows:
                self.resolved(row)
            if history.upto == start:
                break
            budget -= len(rows)
        self._bury()

    def _bury(self) -> None:
        """Move packs that did not resolve to the dead letters, and report each one."""
        if not self._found_dead:
            return
        found, self._found_dead = self._found_dead, []

        def work(db: sqlite3.Connection) -> None:
            for fid, node, seq, received_at, body, e in found:
                db.execute("INSERT INTO dead_letters (node, seq, reason, received_at, kind, body)"
                           " VALUES (?, ?, ?, ?, 'pack', ?)",
                           (node, seq, str(e), received_at, body))
                db.execute("DELETE FROM frames WHERE id = ?", (fid,))

        self.queue.transaction(work)
        for fid, *_ in found:
            self.queue.tail.drop(fid, fid)
        self.reports.extend((node, seq, e.kind, str(e)) for _, node, seq, _, _, e in found)

    def write_history(self, force: bool = False) -> None:
        """Rows resolved since the last write, in a transaction of their own.

        Not durable: the history is a copy; if a power cut takes these rows, it takes `upto`
        with them, and the frames are resolved into the history again.
        """
        history = self.queue.history
        if not (force or history.dirty):
            return
        self.queue.transaction(lambda db: history.flush(db, time.time(), force),
                               durable=False)
        history.written()

    def history_now(self) -> None:
        """Bring the history up to the queue before it is shown."""
        self.catch_up(None)
        self.write_history()

    def next_batch(self, max_records: int, after_id: int = 0) -> Batch | None:
        """Whole frames after `after_id`, leased against eviction (diskcap.py) in the same
        step: the caller releases the lease once, by delivering the batch (`delivered`,
        `delivered_to`) or, when it puts the batch back unsent, with `cap.release`."""
        if self.queue.history.upto < after_id:
            self.catch_up(after_id)  # (only after a crash between two writes)
        items: list[Resolved] = []
        total = 0
        full = False
        cursor = after_id
        while not full:
            rows = self._frames(cursor, BATCH_ROWS)
            if not rows:
                break
            for row in rows:
                if items and total + row[4] > max_records:
                    full = True
                    break
                cursor = row[0]
                res = self.resolved(row)
                if res is not None:
                    items.append(res)
                    total += len(res.rids)
                    if total >= max_records:
                        full = True
                        break
        self._bury()
        if not items:
            return None
        self.queue.cap.lease(items[0].id, items[-1].id)
        return Batch(items[0].id, items[-1].id, items[0].received_at,
                     [rid for r in items for rid in r.rids], [r.text for r in items], full)

    def delivered(self, batch: Batch) -> None:
        self._delete(lambda db: db.execute("DELETE FROM frames WHERE id BETWEEN ? AND ?",
                                           (batch.first_id, batch.last_id)), batch)
        self.queue.tail.drop(batch.last_id, batch.first_id)

    def _delete(self, delete: Callable[[sqlite3.Connection], Any], batch: Batch) -> None:
        now = time.time()
        history = self.queue.history

        def work(db: sqlite3.Connection) -> None:
            history.flush(db, now)  # the history has them before the queue lets go
            delete(db)

        # not durable: a power cut can only undo it, and then the sink gets the batch again
        # (at least once; the reading ids make the repeat harmless upstream)
        self.queue.transaction(work, durable=False)
        history.written()
        self.queue.cap.release(batch.first_id, batch.last_id)
        self.queue.cap.update(self.queue.db)

    def cursor(self, sink: str) -> int:
        row = self.queue.db.execute("SELECT last_id FROM sink_cursors WHERE sink = ?",
                                    (sink,)).fetchone()
        return int(row[0]) if row else 0

    def delivered_to(self, sink: str, batch: Batch, sinks: Sequence[str]) -> None:
        mine = max(self.cursor(sink), batch.last_id)
        mark = min(mine if s == sink else self.cursor(s) for s in sinks)
        if self.queue.history.upto < mark:
            self.catch_up(mark)  # (only after a crash between two writes)

        def delete(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO sink_cursors VALUES (?, ?) ON CONFLICT(sink) DO UPDATE"
                       " SET last_id = max(last_id, excluded.last_id)", (sink, batch.last_id))
            db.execute("DELETE FROM frames WHERE id <= ?", (mark,))

        self._delete(delete, batch)
        self.queue.tail.drop(mark)
        self.cache.drop_upto(mark)
