"""Recent readings kept after delivery, for the local API and the status page.

The queue forgets a reading once upstream confirms it; the status page still wants the
last hours. This bounded table is written in the same transaction as the queue (so it
never shows a reading the queue lost) and trimmed by age and row count. One row holds one
sample of one node (all its readings with the same time, as compact JSON): a commit then
adds one row and one index entry per frame, not per reading, which keeps the pages written
per commit few (the queue's disk cap budgets for them). All functions take the store's
connection and run on the store's thread.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS recent (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    t REAL NOT NULL,
    received_at REAL NOT NULL,
    records TEXT NOT NULL  -- JSON: [{"n": "temperature", "u": "Cel", "v": 12.5}, ...]
);
CREATE INDEX IF NOT EXISTS recent_node_t ON recent (node, t);
-- the newest value of every measurement of every node, kept apart so that the node table
-- never scans hours of history
CREATE TABLE IF NOT EXISTS recent_latest (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,  -- JSON, as in recent.records, with its "t"
    t REAL NOT NULL,
    PRIMARY KEY (node, name)
) WITHOUT ROWID;
"""

VALUE_KEYS = ("v", "vs", "vb", "vd")
TRIM_EVERY_S = 30.0
TRIM_CHUNK = 1000  # ids per DELETE while trimming by age
MAX_LIMIT = 10000


def _dumps(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"))


def short_name(node: str, n: str) -> str:
    """`urn:dev:lantern:SL-0001:temperature` → `temperature` (other names stay whole)."""
    prefix = f"urn:dev:lantern:{node}:"
    return n[len(prefix):] if n.startswith(prefix) and len(n) > len(prefix) else n


def _compact(node: str, r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": short_name(node, r["n"])}
    if "u" in r:
        out["u"] = r["u"]
    for k in VALUE_KEYS:
        if k in r:
            out[k] = r[k]
            break
    return out


@dataclass
class History:
    """Bounded by age (keep_s) and by rows, one per sample (max_rows); oldest go first."""

    keep_s: float = 24 * 3600.0
    max_rows: int = 50_000
    _last_trim: float = 0.0

    def create(self, db: sqlite3.Connection) -> None:
        cols = {r[1] for r in db.execute("PRAGMA table_info(recent)")}
        if cols and "records" not in cols:
            # an older layout (a row per reading): the history is a cache, start it afresh
            db.executescript("DROP TABLE recent; DROP TABLE IF EXISTS recent_latest;")
        db.executescript(SCHEMA)

    def add(self, db: sqlite3.Connection, node: str, records: Iterable[dict[str, Any]],
            now: float) -> None:
        """Insert one frame's records; the caller's transaction makes it atomic with the queue."""
        by_t: dict[float, list[dict[str, Any]]] = {}
        latest = []
        for r in records:
            c = _compact(node, r)
            t = float(r["t"])
            by_t.setdefault(t, []).append(c)
            latest.append((node, c["n"], _dumps(dict(c, t=t)), t))
        db.executemany("INSERT INTO recent (node, t, received_at, records) VALUES (?, ?, ?, ?)",
                       [(node, t, now, _dumps(rs)) for t, rs in by_t.items()])
        db.executemany(
            "INSERT INTO recent_latest VALUES (?, ?, ?, ?) ON CONFLICT(node, name) DO UPDATE"
            " SET record=excluded.record, t=excluded.t WHERE excluded.t >= t", latest)

    def trim(self, db: sqlite3.Connection, now: float, force: bool = False) -> int:
        """Drop rows past the age or count bound; cheap enough to run inside a commit."""
        if not force and now - self._last_trim < TRIM_EVERY_S:
            return 0
        self._last_trim = now
        n = 0
        cutoff = now - self.keep_s
        while True:  # oldest first, a chunk at a time, until the oldest row is young enough
            row = db.execute("SELECT id, received_at FROM recent ORDER BY id LIMIT 1").fetchone()
            if row is None or row[1] >= cutoff:
                break
            n += db.execute("DELETE FROM recent WHERE id < ? AND received_at < ?",
                            (row[0] + TRIM_CHUNK, cutoff)).rowcount
        top = db.execute("SELECT max(id) FROM recent").fetchone()[0]
        if top is not None:
            n += db.execute("DELETE FROM recent WHERE id <= ?", (top - self.max_rows,)).rowcount
        return n

    def readings(self, db: sqlite3.Connection, node: str, since: float, limit: int,
                 name: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Readings with t > since, oldest first; True if more remain (page on with since).

        A page never ends inside one sample time, so `since` = its last t loses nothing.
        """
        limit = max(1, min(limit, MAX_LIMIT))
        out: list[dict[str, Any]] = []
        cur = db.execute("SELECT t, records FROM recent WHERE node = ? AND t > ? ORDER BY t, id",
                         (node, since))
        last_t = None
        for t, text in cur:
            recs = [r for r in json.loads(text) if name is None or r["n"] == name]
            if out and len(out) + len(recs) > limit and t != last_t:
                return out, True
            last_t = t
            out += [{"n": r["n"], "t": t, **{k: v for k, v in r.items() if k != "n"}}
                    for r in recs]
        return out, False

    def latest(self, db: sqlite3.Connection) -> dict[str, dict[str, dict[str, Any]]]:
        """node → measurement → its newest reading."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for node, name, text in db.execute("SELECT node, name, record FROM recent_latest"):
            out.setdefault(node, {})[name] = json.loads(text)
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
