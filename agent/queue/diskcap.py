"""The queue's disk cap ([queue] max_mb, policy): a bound on the state's bytes on disk.

What the cap bounds is the database file plus its WAL. The WAL gets a fixed budget (an
eighth of the cap, at most 4 MiB: `wal_autocheckpoint` and `journal_size_limit` keep it
there); the database's live pages (page_count - freelist_count) get the rest, less a margin
for one group commit. Deleted rows leave free pages that SQLite reuses, so the file only
grows when live data does.

Dead letters (authentic frames whose pack is no use, kept for the operator) have a bound of
their own, cap or no cap: at most DEAD_LETTER_ROWS rows and, under a cap, a twentieth (5 %)
of it in their bodies, whichever is reached first; beyond it the oldest are dropped, counted
in `dead_dropped` (logged once). A node key sending useless packs can so never take the
queue from the other nodes.

At the high mark, room is made in this order:
1. the recent-readings history (a copy of readings for the status page) gives way first;
2. then the dead letters, oldest first (counted in `dead_dropped`);
3. then the policy: `evict_oldest` deletes the undelivered frames that reached the gateway
   first (queue order, the frame id), except those in a batch a sink is sending: that batch
   is retried until it is delivered, and a frame both evicted and delivered would make the
   count lie. Its readings are counted in `evicted`. So, by arrival: the batch in flight
   stays, the frames after it go, the newest stay. A node's retransmitted frame arrives after
   the frames it sent meanwhile, so by sequence number the evicted frames of one node need not
   be one run (docs/reliability.md); `pause_intake` sets
   `paused`, and the ingest stops acknowledging new frames, so the nodes keep them until the
   queue drains to the low mark. Intake is never paused, and is resumed, while the queue
   holds no frame to deliver: nothing would ever drain it.
Every function runs on the store's thread; make_room runs its own small transactions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import intake

log = logging.getLogger("lantern.store")

POLICIES = ("pause_intake", "evict_oldest")
WAL_BUDGET_MAX = 4 << 20
WAL_FRAME_HEADER = 24
CHUNK_ROWS = 128  # rows deleted per transaction while making room
DEAD_LETTER_ROWS = 1000  # dead letters kept at most, the oldest dropped beyond ...
DEAD_LETTER_SHARE = 20  # ... or beyond 1/20 of the cap in their bodies (with a cap)


@dataclass
class DiskCap:
    max_bytes: int = 0  # 0: no cap
    policy: str = "pause_intake"
    paused: bool = False
    evicted: int = 0  # undelivered readings deleted (in whole frames) by evict_oldest
    history_trimmed: int = 0  # history rows deleted to make room
    dead_dropped: int = 0  # dead letters deleted beyond their bound or to make room
    live_bytes: int = 0
    high: int = 0
    low: int = 0
    # batches out at sinks, (first id, last id) → how many: two sinks may hold the same range.
    # Taken on the store's thread (with the read of the batch, so eviction never sees it half
    # made), given back from either thread: hence the lock
    leases: Counter[tuple[int, int]] = field(default_factory=Counter)
    _lease_lock: threading.Lock = field(default_factory=threading.Lock)
    _page: int = 0
    _dead_logged: bool = False

    def configure(self, db: sqlite3.Connection, max_bytes: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown queue policy {policy!r}")
        self.max_bytes, self.policy = max_bytes, policy
        if not max_bytes:
            return
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        frame = page + WAL_FRAME_HEADER
        wal_budget = min(WAL_BUDGET_MAX, max(16 * frame, max_bytes // 8))
        # the WAL peaks near the checkpoint threshold plus one transaction, then is cut back
        db.execute(f"PRAGMA wal_autocheckpoint={max(8, wal_budget // (2 * frame))}")
        db.execute(f"PRAGMA journal_size_limit={wal_budget // 2}")
        margin = max(128 << 10, max_bytes // 16)  # the -shm file and a group commit or two
        self.high = max_bytes - wal_budget - margin
        self.low = self.high - max(16 * page, min(self.high // 10, wal_budget // 4))
        if self.low <= 0:
            raise ValueError(f"queue cap of {max_bytes} bytes is too small to hold anything")
        self.update(db)

    def live(self, db: sqlite3.Connection) -> int:
        """Bytes in use by the database (pages that are not free)."""
        if not self._page:  # fixed once the database exists (runs around every commit)
            self._page = int(db.execute("PRAGMA page_size").fetchone()[0])
        page = self._page
        count = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page * (count - free))

    def update(self, db: sqlite3.Connection) -> None:
        """Re-measure after frames left the queue; intake resumes at the low mark, or once
        no frame is left to deliver (then nothing would ever bring it lower)."""
        self.trim_dead(db)  # (packs that failed to resolve on their way out became some)
        if not self.max_bytes:
            return
        self.live_bytes = self.live(db)
        if self.paused and self.live_bytes > self.low:
            # the history rows written with a delivery take the room its frames left: the
            # history gives way first here too, or the queue would drain and stay paused;
            # then the dead letters, which no delivery ever removes
            self.live_bytes = self._shed(db, self.live_bytes, "recent", "history")
            self.live_bytes = self._shed(db, self.live_bytes, "dead_letters", "dead")
        if self.paused and self.live_bytes <= self.low:
            self.paused = False
            log.info("queue below its cap again (%.2f of %.2f MB): intake resumed, nodes are "
                     "acknowledged again", self.live_bytes / 1e6, self.max_bytes / 1e6)
        elif self.paused and not deliverable(db):
            self.paused = False
            log.warning("queue still at %.2f of its %.2f MB cap with no frame left to deliver "
                        "(what fills it is not readings): intake resumed, pausing would not "
                        "bring it lower", self.live_bytes / 1e6, self.max_bytes / 1e6)

    def dead_bound(self) -> tuple[int, int]:
        """Dead letters kept at most: rows, and bytes of their bodies and reasons."""
        size = self.max_bytes // DEAD_LETTER_SHARE if self.max_bytes else 1 << 62
        return DEAD_LETTER_ROWS, size

    def trim_dead(self, db: sqlite3.Connection) -> None:
        """Drop the oldest dead letters beyond their bound (in the caller's transaction, if
        there is one)."""
        rows, size = db.execute("SELECT count(*), coalesce(sum(length(body) + length(reason)),"
                                " 0) FROM dead_letters").fetchone()
        max_rows, max_size = self.dead_bound()
        if rows <= max_rows and size <= max_size:
            return
        last = None
        for row_id, n in db.execute("SELECT id, length(body) + length(reason) FROM dead_letters"
                                    " ORDER BY id").fetchall():
            if rows <= max_rows and size <= max_size:
                break
            rows, size, last = rows - 1, size - n, row_id
        gone = db.execute("DELETE FROM dead_letters WHERE id <= ?", (last,)).rowcount
        bound = f"{max_rows} rows" + (f" or {max_size / 1e3:.0f} kB" if self.max_bytes else "")
        self._dropped_dead(gone, f"beyond their bound ({bound})")

    def _dropped_dead(self, n: int, why: str) -> None:
        self.dead_dropped += n
        if not self._dead_logged:
            self._dead_logged = True
            log.warning("dead letters %s: the oldest are dropped; each one is counted in "
                        "lantern_dead_letters_dropped_total (logged once)", why)

    def make_room(self, db: sqlite3.Connection) -> None:
        """Around a commit: bring live data under the high mark, or pause intake.

        Rows are deleted in small transactions of their own, so each one's pages fit the WAL
        budget and the checkpoint after it can recycle them.
        """
        if not self.max_bytes:
            return
        live = self.live(db)
        if live > self.high:
            live = self._shed(db, live, "recent", "history")
            live = self._shed(db, live, "dead_letters", "dead")
            if live > self.low and self.policy == "evict_oldest":
                live = self._shed(db, live, "frames", "evict")
        self.live_bytes = live
        if (live > self.high and self.policy == "pause_intake" and not self.paused
                and deliverable(db)):
            self._pause()

    def _pause(self) -> None:
        self.paused = True
        log.warning("queue at its cap (%.2f of %.2f MB): intake paused - new frames are not "
                    "acknowledged, so nodes keep them until upstream drains the queue",
                    self.live_bytes / 1e6, self.max_bytes / 1e6)

    def _shed(self, db: sqlite3.Connection, live: int, table: str, what: str) -> int:
        """Delete the oldest rows of a table in steps until under the low mark; live bytes."""
        cond = "1"
        args: tuple[int, ...] = ()
        with self._lease_lock:
            held = sorted(self.leases) if table == "frames" else []
        if held:
            cond = " AND ".join("NOT (id BETWEEN ? AND ?)" for _ in held)
            args = tuple(x for pair in held for x in pair)
        while live > self.low:
            # RETURNING: an evicted frame counts as the readings it held
            returning = " RETURNING readings" if table == "frames" else " RETURNING 1"
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "
                                  f"WHERE {cond} ORDER BY id LIMIT ?){returning}",
                                  (*args, CHUNK_ROWS)).fetchall()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if not rows:
                break
            gone = sum(r[0] for r in rows)
            if what == "dead":
                self._dropped_dead(gone, f"give way to the queue at its cap "
                                         f"({self.max_bytes / 1e6:.2f} MB)")
            elif what == "evict":
                if not self.evicted:
                    log.warning("queue at its cap (%.2f MB): evicting the oldest undelivered "
                                "readings (policy evict_oldest); each one is counted in "
                                "lantern_evictions", self.max_bytes / 1e6)
                self.evicted += gone
            else:
                self.history_trimmed += gone
            live = self.live(db)
        return live

    def lease(self, first_id: int, last_id: int) -> None:
        """A sink holds these frames in a batch: eviction leaves them alone."""
        with self._lease_lock:
            self.leases[(first_id, last_id)] += 1

    def release(self, first_id: int, last_id: int) -> None:
        """That sink is done with them, or put the batch back unsent (another sink may still
        hold the same range). Every lease must be released once: one that is not protects its
        frames for the process's life, and each adds a term to the eviction's query."""
        key = (first_id, last_id)
        with self._lease_lock:
            self.leases[key] -= 1
            if self.leases[key] <= 0:
                del self.leases[key]


def deliverable(db: sqlite3.Connection) -> bool:
    """Whether the queue holds a frame for upstream (pausing intake can then free room)."""
    return db.execute("SELECT 1 FROM frames LIMIT 1").fetchone() is not None


def disk_bytes(path: Path) -> int:
    """Bytes the queue takes on disk: the database, its WAL, its shared-memory index and
    its intake log (intake.py)."""
    total = 0
    for suffix in ("", "-wal", "-shm", intake.SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
