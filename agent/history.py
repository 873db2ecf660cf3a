"""Recent readings kept after delivery, for the local API and the status page.

The queue forgets a reading once upstream confirms it; the status page still wants the
last hours. This bounded table is written in the same transaction as the queue (so it
never shows a reading the queue lost) and trimmed by age and row count. All functions take
the store's connection and run on the store's thread.
"""

from __future__ import annotations

import itertools
import sqlite3
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS recent (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    t REAL NOT NULL,
    u TEXT,
    v,  -- no declared type: an int stays an int, a float a float
    vs TEXT,
    vb INTEGER,
    vd TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recent_node_t ON recent (node, t);
CREATE INDEX IF NOT EXISTS recent_received ON recent (received_at);
-- the newest value of every measurement of every node, kept apart so that the node table
-- never scans hours of history
CREATE TABLE IF NOT EXISTS recent_latest (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    t REAL NOT NULL,
    u TEXT,
    v,  -- no declared type: an int stays an int, a float a float
    vs TEXT,
    vb INTEGER,
    vd TEXT,
    PRIMARY KEY (node, name)
);
"""

VALUE_KEYS = ("v", "vs", "vb", "vd")
TRIM_EVERY_S = 30.0
MAX_LIMIT = 10000


def short_name(node: str, n: str) -> str:
    """`urn:dev:lantern:SL-0001:temperature` → `temperature` (other names stay whole)."""
    prefix = f"urn:dev:lantern:{node}:"
    return n[len(prefix):] if n.startswith(prefix) and len(n) > len(prefix) else n


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    name, t, u, v, vs, vb, vd = r
    out: dict[str, Any] = {"n": name, "t": t}
    if u is not None:
        out["u"] = u
    if v is not None:
        out["v"] = v
    elif vs is not None:
        out["vs"] = vs
    elif vb is not None:
        out["vb"] = bool(vb)
    elif vd is not None:
        out["vd"] = vd
    return out


@dataclass
class History:
    """Bounded by age (keep_s) and by rows (max_rows); oldest rows go first."""

    keep_s: float = 24 * 3600.0
    max_rows: int = 200_000
    _last_trim: float = 0.0

    def create(self, db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)

    def add(self, db: sqlite3.Connection, node: str, records: Iterable[dict[str, Any]],
            now: float) -> None:
        """Insert one frame's records; the caller's transaction makes it atomic with the queue."""
        rows = []
        for r in records:
            vals = [r.get(k) for k in VALUE_KEYS]
            if vals[2] is not None:
                vals[2] = int(vals[2])
            if isinstance(vals[0], int) and not -(1 << 63) <= vals[0] < 1 << 63:
                # SQLite integers are 64-bit signed; one uint64 value used to fail the whole
                # group commit (the queue keeps it exact as JSON; this copy is for display)
                vals[0] = float(vals[0])
            rows.append((node, short_name(node, r["n"]), float(r["t"]), r.get("u"), *vals))
        db.executemany("INSERT INTO recent (node, name, t, u, v, vs, vb, vd, received_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*x, now) for x in rows])
        db.executemany(
            "INSERT INTO recent_latest VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(node, name) DO UPDATE SET t=excluded.t, u=excluded.u, v=excluded.v,"
            " vs=excluded.vs, vb=excluded.vb, vd=excluded.vd WHERE excluded.t >= t", rows)

    def trim(self, db: sqlite3.Connection, now: float, force: bool = False) -> int:
        """Drop rows past the age or count bound; cheap enough to run inside a commit."""
        if not force and now - self._last_trim < TRIM_EVERY_S:
            return 0
        self._last_trim = now
        n = db.execute("DELETE FROM recent WHERE received_at < ?", (now - self.keep_s,)).rowcount
        top = db.execute("SELECT max(id) FROM recent").fetchone()[0]
        if top is not None:
            n += db.execute("DELETE FROM recent WHERE id <= ?", (top - self.max_rows,)).rowcount
        return n

    def readings(self, db: sqlite3.Connection, node: str, since: float, limit: int,
                 name: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Readings with t > since, oldest first; True if more remain (page on with since)."""
        limit = max(1, min(limit, MAX_LIMIT))
        sql = ("SELECT name, t, u, v, vs, vb, vd FROM recent WHERE node = ? AND t > ?"
               + (" AND name = ?" if name else "") + " ORDER BY t, id LIMIT ?")
        args: tuple[Any, ...] = (node, since, name, limit + 1) if name else (node, since,
                                                                            limit + 1)
        rows = db.execute(sql, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if more:
            # never end a page inside one sample time: the next page starts after it
            last_t = rows[-1][1]
            whole = [r for r in rows if r[1] < last_t]
            rows = whole or rows
        return [_row(r) for r in rows], more

    def latest(self, db: sqlite3.Connection) -> dict[str, dict[str, dict[str, Any]]]:
        """node → measurement → its newest reading."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for node, *rest in db.execute(
                "SELECT node, name, t, u, v, vs, vb, vd FROM recent_latest ORDER BY node, name"):
            out.setdefault(node, {})[rest[0]] = _row(tuple(rest))
        return out

    def sample_times(self, db: sqlite3.Connection, node: str, since: float) -> list[float]:
        """Distinct sample times of a node after `since`, oldest first, led by the last one
        at or before `since` (so a gap across the boundary of two pages is still seen)."""
        lead = db.execute("SELECT max(t) FROM recent WHERE node = ? AND t <= ?",
                          (node, since)).fetchone()[0]
        rows = db.execute("SELECT DISTINCT t FROM recent WHERE node = ? AND t > ? ORDER BY t",
                          (node, since)).fetchall()
        return ([lead] if lead is not None else []) + [r[0] for r in rows]

    def last_times(self, db: sqlite3.Connection, node: str, n: int = 21) -> list[float]:
        """The node's n newest distinct sample times, oldest first."""
        rows = db.execute("SELECT DISTINCT t FROM recent WHERE node = ? ORDER BY t DESC"
                          " LIMIT ?", (node, n)).fetchall()
        return [r[0] for r in reversed(rows)]

    def rows(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM recent").fetchone()[0])


def typical_interval(times: list[float]) -> float | None:
    """The node's sampling interval: the median step between sample times."""
    steps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(steps) if steps else None


def find_gaps(times: list[float], interval: float | None, factor: float = 2.5
              ) -> list[tuple[float, float]]:
    """(from, to) for every step longer than `factor` intervals: readings that never came."""
    if interval is None or interval <= 0:
        return []
    # sample times are whole seconds on the node: allow a step of rounding on top
    limit = max(interval * factor, interval + 2.0)
    return [(a, b) for a, b in itertools.pairwise(times) if b - a > limit]
