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
                touched[f.node] = touched.get(f.node, 0) + 1
            for node, n in touched.items():
                w = windows[node]
                db.execute(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?, ?) ON CONFLICT(node) DO UPDATE SET"
                    " high=excluded.high, window=excluded.window,"
                    " last_seen=excluded.last_seen, frames=frames + excluded.frames",
                    (node, w.high, _to_sql(w.bits), now, n))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def next_batch(self, max_records: int) -> Batch | None:
        return await self._run(self._next_batch, max_records)  # type: ignore[no-any-return]

    def _next_batch(self, max_records: int) -> Batch | None:
        rows = self.db.execute(
            "SELECT id, received_at, rid, record FROM readings ORDER BY id LIMIT ?",
            (max_records,)).fetchall()
        if not rows:
            return None
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
            db.execute("ROLLBACK")
            raise

    async def depth(self) -> tuple[int, float | None]:
        """Readings waiting, and the age in seconds of the oldest one."""
        return await self._run(self._depth)  # type: ignore[no-any-return]

    def _depth(self) -> tuple[int, float | None]:
        n = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        oldest = self.db.execute(
            "SELECT received_at FROM readings ORDER BY id LIMIT 1").fetchone()
        oldest = oldest[0] if oldest else None
        return n, (time.time() - oldest) if oldest is not None else None
