"""The durable queue: SQLite in WAL mode, driven from one worker thread.

Frames are committed in groups (everything that arrived while the previous commit ran),
which keeps fsyncs per frame low without delaying any single ACK by more than one commit.
The replay window of every node is updated in the same transaction as its readings.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diskcap import DiskCap
from .history import History, typical_interval

WINDOW = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    -- AUTOINCREMENT: ids are never reused, so a delivery cursor can never skip a reading
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rid TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL,
    received_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL,
    cose BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_cursors (
    -- each sink's last delivered reading id: a slow sink never holds back another
    sink TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    high INTEGER NOT NULL,
    window INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    frames INTEGER NOT NULL
);
"""


@dataclass
class Accepted:
    """A verified frame on its way to disk."""

    node: str
    seq: int
    cose: bytes
    records: list[dict[str, Any]] | None  # None: authentic but undecodable (dead letter)
    reason: str = ""


@dataclass
class Window:
    """Per-node replay state: the highest sequence and a bitmap of the 64 below it."""

    high: int = -1
    bits: int = 0

    def seen(self, seq: int) -> bool | None:
        """True if seq was accepted, False if new, None if too old to tell (a replay)."""
        if seq > self.high:
            return False
        if seq <= self.high - WINDOW:
            return None
        return bool(self.bits >> (self.high - seq) & 1)

    def mark(self, seq: int) -> None:
        if seq > self.high:
            shift = seq - self.high
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.high = seq
        else:
            self.bits |= 1 << (self.high - seq)


def _to_sql(bits: int) -> int:
    """SQLite integers are signed 64-bit: store the bitmap's top bit as the sign."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def _from_sql(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


@dataclass(frozen=True)
class Batch:
    first_id: int
    last_id: int
    first_received: float
    rids: list[str]
    records: list[str]


class Store:
    """All SQLite access runs on one dedicated thread, never on the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lantern-store")
        self._db: sqlite3.Connection | None = None
        self.history = History()  # recent readings kept after delivery (local API)
        self.cap = DiskCap()  # [queue] max_mb and policy; set by limit()

    async def __aenter__(self) -> Store:
        await self._run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed (and so acknowledged) frame survives a power cut, not only a crash
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self.history.create(db)
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    async def windows(self) -> dict[str, Window]:
        return await self._run(self._windows)  # type: ignore[no-any-return]

    def _windows(self) -> dict[str, Window]:
        rows = self.db.execute("SELECT node, high, window FROM nodes").fetchall()
        return {node: Window(high, _from_sql(bits)) for node, high, bits in rows}

    async def commit(self, frames: Sequence[Accepted], windows: dict[str, Window]) -> None:
        await self._run(self._commit, frames, windows)

    def _commit(self, frames: Sequence[Accepted], windows: dict[str, Window]) -> None:
        now = time.time()
        db = self.db
        self.cap.make_room(db)  # before inserting, so freed pages are reused, not added
        db.execute("BEGIN IMMEDIATE")
        try:
            touched: dict[str, int] = {}
            for f in frames:
                if f.records is None:
                    db.execute(
                        "INSERT INTO dead_letters (node, seq, reason, received_at, cose)"
                        " VALUES (?, ?, ?, ?, ?)", (f.node, f.seq, f.reason, now, f.cose))
                else:
                    # OR IGNORE: a reading id already queued is the same reading again
                    db.executemany(
                        "INSERT OR IGNORE INTO readings (rid, node, received_at, record)"
                        " VALUES (?, ?, ?, ?)",
                        [(r["id"], f.node, now, json.dumps(r, separators=(",", ":")))
                         for r in f.records])
                    self.history.add(db, f.node, f.records, now)
                touched[f.node] = touched.get(f.node, 0) + 1
            for node, n in touched.items():
                w = windows[node]
                db.execute(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?, ?) ON CONFLICT(node) DO UPDATE SET"
                    " high=excluded.high, window=excluded.window,"
                    " last_seen=excluded.last_seen, frames=frames + excluded.frames",
                    (node, w.high, _to_sql(w.bits), now, n))
            self.history.trim(db, now)
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (disk full, I/O error): a second ROLLBACK
            # would fail and hide the real error
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.cap.make_room(db)  # at the high mark now: pause before more frames are taken

    async def next_batch(self, max_records: int, after_id: int = 0) -> Batch | None:
        return await self._run(  # type: ignore[no-any-return]
            self._next_batch, max_records, after_id)

    def _next_batch(self, max_records: int, after_id: int = 0) -> Batch | None:
        rows = self.db.execute(
            "SELECT id, received_at, rid, record FROM readings WHERE id > ? ORDER BY id"
            " LIMIT ?", (after_id, max_records)).fetchall()
        if not rows:
            return None
        self.cap.lease(rows[0][0], rows[-1][0])
        return Batch(rows[0][0], rows[-1][0], rows[0][1],
                     [r[2] for r in rows], [r[3] for r in rows])

    async def delivered(self, batch: Batch) -> None:
        await self._run(self._delivered, batch)

    def _delivered(self, batch: Batch) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM readings WHERE id BETWEEN ? AND ?",
                       (batch.first_id, batch.last_id))
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (disk full, I/O error): a second ROLLBACK
            # would fail and hide the real error
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.cap.release(batch.first_id)
        self.cap.update(db)

    async def cursor(self, sink: str) -> int:
        """The last reading id this sink has confirmed (0: none yet)."""
        return await self._run(self._cursor, sink)  # type: ignore[no-any-return]

    def _cursor(self, sink: str) -> int:
        row = self.db.execute("SELECT last_id FROM sink_cursors WHERE sink = ?",
                              (sink,)).fetchone()
        return int(row[0]) if row else 0

    async def delivered_to(self, sink: str, batch: Batch, sinks: Sequence[str]) -> None:
        """Advance one sink's cursor; readings every configured sink has leave the queue."""
        await self._run(self._delivered_to, sink, batch, tuple(sinks))

    def _delivered_to(self, sink: str, batch: Batch, sinks: tuple[str, ...]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO sink_cursors VALUES (?, ?) ON CONFLICT(sink) DO UPDATE"
                       " SET last_id = max(last_id, excluded.last_id)", (sink, batch.last_id))
            marks = [self._cursor(s) for s in sinks]
            db.execute("DELETE FROM readings WHERE id <= ?", (min(marks),))
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (disk full, I/O error): a second ROLLBACK
            # would fail and hide the real error
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.cap.release(batch.first_id)
        self.cap.update(db)

    async def limit(self, max_bytes: int, policy: str) -> None:
        """Cap the queue's bytes on disk (0: no cap); policy pause_intake or evict_oldest."""
        await self._run(self.cap.configure, self.db, max_bytes, policy)

    async def depth(self) -> tuple[int, float | None]:
        """Readings waiting, and the age in seconds of the oldest one."""
        return await self._run(self._depth)  # type: ignore[no-any-return]

    def _depth(self) -> tuple[int, float | None]:
        n = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        oldest = self.db.execute(
            "SELECT received_at FROM readings ORDER BY id LIMIT 1").fetchone()
        oldest = oldest[0] if oldest else None
        return n, (time.time() - oldest) if oldest is not None else None

    # ---- read-only views for the local API (history.py holds the SQL of the recent table)

    async def recent(self, node: str, since: float, limit: int, name: str | None = None
                     ) -> tuple[list[dict[str, Any]], bool, list[float]]:
        """A node's recent readings after `since`, whether more remain, and its sample times."""
        def q() -> tuple[list[dict[str, Any]], bool, list[float]]:
            rows, more = self.history.readings(self.db, node, since, limit, name)
            return rows, more, self.history.sample_times(self.db, node, since)
        return await self._run(q)  # type: ignore[no-any-return]

    async def overview(self) -> dict[str, Any]:
        """Queue depth and bytes, oldest age, per-node last seen and newest values."""
        return await self._run(self._overview)  # type: ignore[no-any-return]

    def _overview(self) -> dict[str, Any]:
        db = self.db
        n, size = db.execute("SELECT count(*), coalesce(sum(length(record)), 0)"
                             " FROM readings").fetchone()
        _, oldest = self._depth()
        nodes = {node: {"last_seen": last, "frames": frames} for node, last, frames in
                 db.execute("SELECT node, last_seen, frames FROM nodes")}
        return {"queue_readings": n, "queue_bytes": size, "oldest_age_s": oldest,
                "nodes": nodes, "latest": self.history.latest(db),
                "intervals": {node: typical_interval(self.history.last_times(db, node))
                              for node in nodes},
                "dead_letters": db.execute("SELECT count(*) FROM dead_letters").fetchone()[0],
                "recent_rows": self.history.rows(db)}

