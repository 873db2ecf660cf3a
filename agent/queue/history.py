"""Recent readings kept after delivery, for the local API and the status page.

The queue forgets a frame once every sink has it; the status page still wants the last
hours. Frames enter this bounded table once they are resolved (resolve.py) — when a
sink takes them, or when the API asks first — never on the ACK path. One row holds one
sample of one node (all its readings with the same time): the node's pack itself when the
frame is one sample (resolved again when the row is read, which is rare: writing is what
happens for every frame), compact JSON otherwise; the table is trimmed by age and row count.
The newest value of every measurement is kept in memory and saved with the rows every
LATEST_EVERY_S; rows older than keep_s are trimmed every TRIM_EVERY_S. Rows wait in memory
until the store's next write
(`flush`, in the caller's transaction); `upto` is the last frame id they cover, saved with
them, so frames a crash kept out of the history are resolved into it again after a restart.
All functions that take a connection run on the store's thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import statistics
import zlib
from dataclasses import dataclass, field
from typing import Any

from .. import protocol
from ..timesync import GATEWAY_UNSYNCED, TIME_Q, TimeSync

SCHEMA = """
CREATE TABLE IF NOT EXISTS recent (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    t REAL NOT NULL,
    received_at REAL NOT NULL,
    format INTEGER NOT NULL,  -- 0: the frame's SenML CBOR pack, every reading at time t;
    body BLOB NOT NULL        -- 1: JSON [{"n": "temperature", "u": "Cel", "v": 12.5}, ...];
                              -- 2: the pack deflated with ZDICT (PACK_Z_ROW)
);
CREATE INDEX IF NOT EXISTS recent_node_t ON recent (node, t);
-- the newest value of every measurement of every node as of `latest_rows` in history_meta
CREATE TABLE IF NOT EXISTS recent_latest (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,  -- JSON, as in recent (format 1), with its "t"
    t REAL NOT NULL,
    PRIMARY KEY (node, name)
) WITHOUT ROWID;
-- rows anchored at a receipt stamped while the gateway's clock was unsynchronised (time.q
-- bit 4): corrected by the clock's step once it is known, else left flagged (docs/time.md)
CREATE TABLE IF NOT EXISTS recent_unsynced (id INTEGER PRIMARY KEY, received_at REAL NOT NULL);
-- upto: the last frame id in the history; latest_rows: recent.id the snapshot includes
CREATE TABLE IF NOT EXISTS history_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

PACK_ROW, JSON_ROW, PACK_Z_ROW = 0, 1, 2
# Format 2 (issue 22, SD-card wear: the history is the one copy of every frame SQLite keeps
# on a street): the pack as raw DEFLATE (RFC 1951) with a preset dictionary, the names a
# Lantern node's pack carries, in the order it carries them. A 365-byte pack of 25 readings
# takes ~150. Rows are read with the dictionary they were written with: never change it; a
# new one takes a new format number.
_ZDICT_NAMES = ("LAeq", "LAmax", "battery", "co2", "cycle_ms", "energy", "heap_free",
                "heap_peak", "humidity", "illuminance", "lamp_current", "lamp_power",
                "lamp_voltage", "outbox", "pm1", "pm10", "pm10_corr", "pm1_corr", "pm2_5",
                "pm2_5_corr", "pm4", "pm4_corr", "pressure", "temperature", "uptime")
ZDICT = b"".join(b"\xa2\x00" + bytes([0x60 + len(n)]) + n.encode() + b"\x02\xf9\x38\x00"
                 for n in _ZDICT_NAMES)  # CBOR {0: name, 2: 0.5} each
TRIM_EVERY_S = 30.0
# The newest values are saved this often (issue 22, SD-card wear: a street's snapshot is a
# row per node and measurement, 420 rows for 20 nodes, all rewritten each time); at start
# the rows written after the snapshot are replayed into it, so a longer interval costs a
# longer replay, never a value.
LATEST_EVERY_S = 3600.0
TRIM_CHUNK = 1000  # ids per DELETE while trimming by age
MAX_LIMIT = 10000

log = logging.getLogger("lantern.history")


def _dumps(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"))


def short_name(node: str, n: str) -> str:
    """`urn:dev:lantern:SL-0001:temperature` → `temperature` (other names stay whole)."""
    prefix = protocol.base_name(node)
    return n[len(prefix):] if n.startswith(prefix) and len(n) > len(prefix) else n


def _compact(node: str, r: dict[str, Any]) -> dict[str, Any]:
    """A record as the history shows it: short name, without its time and id."""
    return {"n": short_name(node, r["n"]), **{k: v for k, v in r.items()
                                               if k not in ("n", "t", "id")}}


def _view(name: str, r: dict[str, Any]) -> dict[str, Any]:
    return {**_compact("", r), "n": name, "t": r["t"]}


def deflate(pack: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=ZDICT)
    return z.compress(pack) + z.flush()


def inflate(body: bytes) -> bytes:
    """A PACK_Z_ROW's pack (at most a frame's size). ValueError if it is not one."""
    z = zlib.decompressobj(-15, zdict=ZDICT)
    try:
        pack = z.decompress(body, protocol.MAX_FRAME)
    except zlib.error as e:
        raise ValueError(f"history row: {e}") from None
    if not z.eof or z.unconsumed_tail:
        raise ValueError("history row: not a whole deflated pack")
    return pack


def row_records(node: str, fmt: int, body: bytes | str) -> list[dict[str, Any]]:
    """A history row's readings, compact (a pack is resolved again as it is read)."""
    if fmt == PACK_Z_ROW:
        assert isinstance(body, bytes)
        body, fmt = inflate(body), PACK_ROW
    if fmt == PACK_ROW:
        assert isinstance(body, bytes)
        return [_compact(node, r) for r in protocol.resolve_pack(body, node=node)]
    out: list[dict[str, Any]] = json.loads(body)
    return out


@dataclass
class History:
    """Bounded by age (keep_s) and by rows, one per sample (max_rows); oldest go first."""

    keep_s: float = 24 * 3600.0
    max_rows: int = 50_000
    upto: int = 0  # frames up to this id are in the history (written, or in _pending)
    _saved: int = 0  # upto as written
    _last_trim: float = 0.0
    _last_latest: float = 0.0
    # the gateway's clock: corrects rows stamped while it was unsynchronised (docs/time.md)
    clock: TimeSync | None = None
    _pending: list[tuple[str, float, float, int, bytes | str]] = field(default_factory=list)
    _pending_unsynced: set[int] = field(default_factory=set)  # indices into _pending
    _unsynced: int = 0  # rows in recent_unsynced
    _latest: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _newest: dict[str, float] = field(default_factory=dict)  # node → newest sample time
    _unreadable: int = 0  # rows a later resolve_pack refuses (logged once)

    def create(self, db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        self.upto = self._saved = self._meta(db, "upto")
        self._unsynced = db.execute("SELECT count(*) FROM recent_unsynced").fetchone()[0]
        for node, name, text in db.execute("SELECT node, name, record FROM recent_latest"):
            self._latest.setdefault(node, {})[name] = json.loads(text)
        # rows written after the snapshot (a crash came before the next one)
        for node, t, fmt, body in db.execute(
                "SELECT node, t, format, body FROM recent WHERE id > ? ORDER BY id",
                (self._meta(db, "latest_rows"),)):
            for r in self._records(node, fmt, body):
                self._keep(node, r["n"], {**r, "t": t})
        for node, lat in self._latest.items():
            self._newest[node] = max((r["t"] for r in lat.values()), default=float("-inf"))

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM history_meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _records(self, node: str, fmt: int, body: bytes | str) -> list[dict[str, Any]]:
        try:
            return row_records(node, fmt, body)
        except Exception as e:  # FrameError; anything else would stop the store opening
            # (only if an upgrade made resolve_pack stricter than the one that took the frame)
            self._unreadable += 1
            if self._unreadable == 1:
                log.warning("history: a sample of node %s no longer resolves (%s); such rows "
                            "are left out of the history", node, e)
            return []

    def _keep(self, node: str, name: str, r: dict[str, Any]) -> None:
        lat = self._latest.setdefault(node, {})
        old = lat.get(name)
        if old is None or r["t"] >= old["t"]:
            lat[name] = r

    def add(self, frame_id: int, node: str, received_at: float,
            records: list[dict[str, Any]], pack: bytes | None) -> None:
        """One resolved frame; `pack`: its SenML CBOR pack, if it came as one."""
        self.upto = max(self.upto, frame_id)
        if not records:
            return
        t0 = records[0]["t"]
        # a pack anchored at an unvouched receipt (its time.q flag is the gateway's): kept as
        # resolved, flag included, and corrected once the clock's step is known
        unsynced = _unsynced_flag(records)
        if unsynced or pack is None or not all(r["t"] == t0 for r in records):
            by_t: dict[float, list[dict[str, Any]]] = {}
            for r in records:
                by_t.setdefault(float(r["t"]), []).append(_compact(node, r))
            if unsynced:
                self._pending_unsynced.update(range(len(self._pending),
                                                    len(self._pending) + len(by_t)))
            self._pending += [(node, t, received_at, JSON_ROW, _dumps(rs))
                              for t, rs in by_t.items()]
            self._keep_all(node, records)
            return
        # the common case: one sample, kept as the pack (resolved again only if it is read)
        self._pending.append((node, float(t0), received_at, PACK_Z_ROW, deflate(pack)))
        if t0 < self._newest.get(node, float("-inf")):
            self._keep_all(node, records)  # an older sample: value by value
            return
        prefix = protocol.base_name(node)  # short_name, inlined: this runs for every frame
        plen = len(prefix)
        self._latest.setdefault(node, {}).update(zip(
            [n[plen:] if n.startswith(prefix) and len(n) > plen else n
             for n in [r["n"] for r in records]], records, strict=True))
        self._newest[node] = t0

    def _keep_all(self, node: str, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._keep(node, short_name(node, r["n"]), r)
        self._newest[node] = max(self._newest.get(node, float("-inf")),
                                 max(r["t"] for r in records))

    def skip(self, frame_id: int) -> None:
        """A frame that will never be in the history (a dead letter)."""
        self.upto = max(self.upto, frame_id)

    def flush(self, db: sqlite3.Connection, now: float, force: bool = False) -> None:
        """Write waiting rows and `upto` (in the caller's transaction); trim and save the
        newest values every TRIM_EVERY_S. Call `written` once the transaction commits."""
        insert = "INSERT INTO recent (node, t, received_at, format, body) VALUES (?, ?, ?, ?, ?)"
        if self._pending_unsynced:  # (rare: one row at a time, to learn their ids)
            for i, row in enumerate(self._pending):
                rid = db.execute(insert, row).lastrowid
                if i in self._pending_unsynced:
                    db.execute("INSERT INTO recent_unsynced VALUES (?, ?)", (rid, row[2]))
                    self._unsynced += 1
        elif self._pending:
            db.executemany(insert, self._pending)
        if self._unsynced and self.clock is not None and self.clock.synchronized:
            self.correct(db, self.clock)
        db.execute("INSERT OR REPLACE INTO history_meta VALUES ('upto', ?)", (self.upto,))
        if force or now - self._last_trim >= TRIM_EVERY_S:
            self._last_trim = now
            self.trim(db, now)
        if force or now - self._last_latest >= LATEST_EVERY_S:
            self._last_latest = now
            db.execute("DELETE FROM recent_latest")
            db.executemany("INSERT INTO recent_latest VALUES (?, ?, ?, ?)", [
                (node, name, _dumps(_view(name, r)), float(r["t"]))
                for node, lat in self._latest.items() for name, r in lat.items()])
            db.execute("INSERT OR REPLACE INTO history_meta SELECT 'latest_rows',"
                       " coalesce(max(id), 0) FROM recent")

    def correct(self, db: sqlite3.Connection, clock: TimeSync) -> int:
        """Rows stamped while the clock was unsynchronised, as the sinks now resolve them:
        moved by the step it took and the gateway's flag cleared, or (no step known, ever)
        left flagged. Returns the rows corrected."""
        done = 0
        for rid, received_at in db.execute("SELECT id, received_at FROM recent_unsynced"
                                           ).fetchall():
            at, ok = clock.correct(received_at)
            row = db.execute("SELECT node, t, body FROM recent WHERE id = ?", (rid,)).fetchone()
            if ok and row is not None:
                node, t, body = row
                # the node's relative times are whole seconds: as fix_times rounds them
                new_t = float(t + round(at) - round(received_at))
                old = json.loads(body)
                recs = _unflagged(old)
                db.execute("UPDATE recent SET t = ?, body = ? WHERE id = ?",
                           (new_t, _dumps(recs), rid))
                self._recorrect(node, t, new_t, [r["n"] for r in old], recs)
                done += 1
            db.execute("DELETE FROM recent_unsynced WHERE id = ?", (rid,))
            self._unsynced -= 1
        if done:
            log.info("history: %d sample(s) stamped while the clock was unsynchronised, "
                     "corrected by its step", done)
        return done

    def _recorrect(self, node: str, t: float, new_t: float, names: list[str],
                   recs: list[dict[str, Any]]) -> None:
        """The newest values, if they came from a corrected row."""
        lat = self._latest.get(node, {})
        for name in names:
            if name in lat and lat[name]["t"] == t:
                del lat[name]  # (a gateway-made time.q the correction removed stays gone)
        for r in recs:
            self._keep(node, r["n"], {**r, "t": new_t})
        if lat:
            self._newest[node] = max(r["t"] for r in lat.values())

    def written(self) -> None:
        """The transaction holding `flush` committed: its rows are on disk."""
        self._pending = []
        self._pending_unsynced = set()
        self._saved = self.upto

    @property
    def dirty(self) -> bool:
        return (bool(self._pending) or self._saved != self.upto
                or bool(self._unsynced and self.clock is not None and self.clock.synchronized))

    def trim(self, db: sqlite3.Connection, now: float) -> int:
        """Drop rows past the age or count bound."""
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
        if n and self._unsynced:
            self._unsynced -= db.execute("DELETE FROM recent_unsynced WHERE id NOT IN"
                                         " (SELECT id FROM recent)").rowcount
        return n

    def readings(self, db: sqlite3.Connection, node: str, since: float, limit: int,
                 name: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Readings with t > since, oldest first; True if more remain (page on with since).

        A page never ends inside one sample time, so `since` = its last t loses nothing.
        """
        limit = max(1, min(limit, MAX_LIMIT))
        out: list[dict[str, Any]] = []
        cur = db.execute("SELECT t, format, body FROM recent WHERE node = ? AND t > ?"
                         " ORDER BY t, id", (node, since))
        last_t = None
        for t, fmt, body in cur:
            recs = [r for r in self._records(node, fmt, body) if name is None or r["n"] == name]
            if out and len(out) + len(recs) > limit and t != last_t:
                return out, True
            last_t = t
            out += [{"n": r["n"], "t": t, **{k: v for k, v in r.items() if k not in ("n", "t")}}
                    for r in recs]
        return out, False

    def latest(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node → measurement → its newest reading."""
        return {node: {name: _view(name, r) for name, r in lat.items()}
                for node, lat in self._latest.items()}

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


def _unsynced_flag(records: list[dict[str, Any]]) -> bool:
    """Whether a frame's time.q carries the gateway's bit: anchored at an unvouched receipt."""
    return any(r["n"].endswith(":" + TIME_Q) and type(r.get("v")) is int
               and r["v"] & GATEWAY_UNSYNCED for r in records)


def _unflagged(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compact records without the gateway's time.q bit (a time.q left at 0 is dropped)."""
    out = []
    for r in recs:
        if r["n"] == TIME_Q and type(r.get("v")) is int:
            r = {**r, "v": r["v"] & ~GATEWAY_UNSYNCED}
            if not r["v"]:
                continue
        out.append(r)
    return out


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
