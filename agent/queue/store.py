"""The durable queue: SQLite in WAL mode, driven from one worker thread.

What an ACK waits for is small: one row per frame (node, sequence, the pack as the node
sealed it) and the node's replay window, in the same transaction, committed in groups
(everything that arrived while the previous commit ran) with synchronous=FULL, by one
writer: ingest (agent/ingest.py), for the nodes' frames and third-party readings alike. Where
deliveries are recorded in rounds (`deliver_every_s`), the group goes to the intake log
instead, and into SQLite in bulk once a round (intake.py). Packs
are resolved into SenML-JSON (resolve.py), and enter the history (history.py), when the
forward stage takes them in a batch for a sink (batches.py) or the local API asks — never
while a node waits. The file's tables and layouts: layout.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .batches import Batches
from .diskcap import DiskCap
from .history import History, typical_interval
from .intake import SUFFIX as INTAKE_SUFFIX
from .intake import IntakeLog, Row, Tail, WindowRow, sync_dir
from .layout import SCHEMA, SCHEMA_VERSION, check_layout, migrate
from .resolve import PACK, RECORDS, Batch, Cache, dumps

__all__ = ["WINDOW", "Accepted", "Store", "Window"]

log = logging.getLogger("lantern.store")

WINDOW = 64
_MASK = (1 << WINDOW) - 1
# FULL: a committed (and so acknowledged) frame survives a power cut, not only a crash. Never
# configurable; only the power-cut scenario lowers it, on purpose, to show it then fails
# (hil_tests/harness/powercut.py, docs/reliability.md).
SYNCHRONOUS = "FULL"
# A new queue's page size (issue 22, SD-card wear): every page a commit touches is written
# whole into the WAL, and a street's commit touches a few pages to add a few 300-byte rows.
# An existing queue keeps the page size it was made with.
PAGE_SIZE = 1024
# Deliveries recorded in groups (issue 22; [queue] deliver_every_s): a batch a sink confirmed
# leaves the queue, with its sink cursor and the history rows of its frames, at most that
# much later, in one transaction with the batches confirmed meanwhile — not one per batch, and
# at once when OWED_FRAMES_MAX frames are owed (a backlog draining).
# The sink's own cursor (forward.py) moves on at once; only a crash in between sends those
# batches again (the same reading ids: upstream drops the repeat). 0: each batch is recorded
# as it is confirmed. This default is for a Store made without configuration (tests, tools);
# the gateway sets `deliver_every_s`.
DELIVER_EVERY_S = 0.0
OWED_FRAMES_MAX = 256
# The intake log (intake.py): with deliveries recorded in rounds, a group commit is appended
# to it and synced, and its frames wait in memory until the round's end records them into
# SQLite with the deliveries. False: every group commit goes into SQLite, as before issue 22
# (bench/disk_wear.py measures both). A round also ends at TAIL_MAX frames or LOG_MAX bytes
# appended; above TAIL_HARD frames (SQLite failing to take them) commits go to SQLite, and
# fail there, so nothing more is acknowledged than the log and memory hold.
INTAKE_LOG = True
TAIL_MAX = 512
LOG_MAX = 1 << 20
TAIL_HARD = 4 * TAIL_MAX
# under a disk cap smaller than this the log gives its space back at each round's end
LOG_SHRINK_BELOW = 64 * LOG_MAX


@dataclass
class Accepted:
    """A verified frame on its way to disk: a pack (resolved later), records, or neither."""

    node: str
    seq: int
    cose: bytes  # the verified message, kept if it is a dead letter
    records: list[dict[str, Any]] | None  # made by the gateway (third-party adverts)
    reason: str = ""  # why it is a dead letter (no pack and no records)
    pack: bytes | None = None  # the SenML CBOR pack, as the node sealed it
    n: int = 0  # records in the pack (protocol.pack_size)

    @property
    def readings(self) -> int:
        return self.n if self.pack is not None else len(self.records or ())


@dataclass
class Window:
    """Per-node replay state: the highest sequence and a bitmap of the 64 below it, under
    the key `key` (protocol.key_id; b"": none): a new key starts a new window."""

    high: int = -1
    bits: int = 0
    key: bytes = b""

    def seen(self, seq: int) -> bool | None:
        """True if seq was accepted, False if new, None if too old to tell (a replay)."""
        if seq > self.high:
            return False
        if seq <= self.high - WINDOW:
            return None
        return bool(self.bits >> (self.high - seq) & 1)

    def mark(self, seq: int) -> None:
        """Record seq as accepted. One at or below high - WINDOW is left out: a group commit
        may hold a node's frame taken as new before a newer one of the same group moved the
        window past it; the frame is stored all the same, and the window refuses it from now
        on as too old (`seen` is None), so leaving it out opens no replay."""
        if seq > self.high:
            shift = seq - self.high
            self.bits = ((self.bits << shift) | 1) & _MASK if shift < WINDOW else 1
            self.high = seq
        elif seq > self.high - WINDOW:
            self.bits = (self.bits | 1 << (self.high - seq)) & _MASK


def _record_windows(db: sqlite3.Connection, windows: Sequence[WindowRow],
                    seen: dict[str, tuple[float, int]]) -> None:
    """Replay windows, each only forward, and the rows of the nodes `seen` (node → last
    seen, frames taken): their window with the highest sequence, of any key."""
    # a window only moves forward (WHERE): one made fresh in memory while the store held
    # this key's can never write over it
    db.executemany(
        "INSERT INTO windows VALUES (?, ?, ?, ?) ON CONFLICT(node, key_id) DO UPDATE"
        " SET high=excluded.high, window=excluded.window WHERE excluded.high >= windows.high",
        [(node, key, high, _to_sql(bits)) for node, key, high, bits in windows])
    best: dict[str, WindowRow] = {}
    for w in windows:
        if w[0] not in best or w[2] > best[w[0]][2]:
            best[w[0]] = w
    # (SET reads the row as it was: every CASE compares with the old high)
    db.executemany(
        "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(node) DO UPDATE SET"
        " last_seen=excluded.last_seen, frames=frames + excluded.frames,"
        " window=CASE WHEN excluded.high >= high THEN excluded.window ELSE window END,"
        " key_id=CASE WHEN excluded.high >= high THEN excluded.key_id ELSE key_id END,"
        " high=max(high, excluded.high)",
        [(node, best[node][2], _to_sql(best[node][3]), last, n, best[node][1] or None)
         for node, (last, n) in seen.items() if node in best])


def _to_sql(bits: int) -> int:
    """SQLite integers are signed 64-bit: store the bitmap's top bit as the sign."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def _from_sql(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


DeadLetterHook = Callable[[str, int, str, str], None]  # node, seq, kind, detail


class Store:
    """All SQLite access runs on one dedicated thread, never on the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lantern-store")
        self._db: sqlite3.Connection | None = None
        self.history = History()  # recent readings kept after delivery (local API)
        self.cap = DiskCap()  # [queue] max_mb and policy; set by limit()
        # the forward stage's store-thread half: batches for sinks, the history's feed
        self.out = Batches(self)
        self.on_dead_letter: DeadLetterHook | None = None  # called on the event loop
        # sink → (its newest confirmed batch not recorded yet, the sinks, batches folded into
        # it: their leases end when it is recorded); deliver_every_s
        self._owed: dict[str, tuple[Batch, tuple[str, ...], list[Batch]]] = {}
        self._owed_since = 0.0
        self._owed_frames = 0  # frames in the batches owed (OWED_FRAMES_MAX)
        # deliveries recorded every this many seconds ([queue] deliver_every_s); None: the
        # module's DELIVER_EVERY_S
        self.deliver_every_s: float | None = None
        self._collided: list[tuple[str, int, str, str]] = []  # reports of the last commit
        self.tail = Tail()  # frames on the intake log, not yet in SQLite
        self._log: IntakeLog | None = None  # opened when there is one, else at first use
        self._tail_since = 0.0
        self._next_id = 0  # the next frame id the intake log gives (0: read it from SQLite)

    async def __aenter__(self) -> Store:
        await self._run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            while self.out.reports:
                report = self.out.reports.popleft()
                if self.on_dead_letter is not None:
                    self.on_dead_letter(*report)

    def _open(self) -> None:
        made = [p for p in self.path.parents if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._check_schema(db)
            migrate(db)
            if new:
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.history.create(db)
            if new and SYNCHRONOUS == "FULL":
                # SQLite syncs the directory for a journal or WAL it creates, never for the
                # database file: without this, a power cut could take the file's name away
                # with every frame acknowledged in it (the WAL alone is no database)
                for d in {self.path.parent, *(p.parent for p in made)}:
                    sync_dir(d)
        except BaseException:
            db.close()
            raise
        self._db = db
        log_path = self.path.with_name(self.path.name + INTAKE_SUFFIX)
        if log_path.exists():
            try:
                self._replay(log_path)
            except BaseException:
                self._db = None
                db.close()
                raise

    def _replay(self, path: Path) -> None:
        """Frames a power cut or crash left on the intake log go into SQLite before anything
        reads the queue (the same frames again are ignored, as at intake)."""
        self._log = IntakeLog(path, sync=SYNCHRONOUS != "OFF")
        try:
            records = self._log.open()
        except OSError as e:
            raise ConfigError(f"intake log {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"intake log {path}: {e}; move it away only once you know what "
                              "wrote it: it may hold acknowledged frames") from None
        if not records:
            return
        db = self.db
        # a round the store recorded before it stopped (its ids are at most the sequence the
        # flush left) is not taken again: not its frames, not their count
        recorded = db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence"
                              " WHERE name = 'frames'").fetchone()[0]
        for rows, windows in records:
            self.tail.add([r for r in rows if r[0] > recorded], windows)
        # frames every sink had (their deliveries recorded, the round not) do not wait again
        cursors = [c for (c,) in db.execute("SELECT last_id FROM sink_cursors")]
        if cursors:
            self.tail.drop(min(cursors))
        n = len(self.tail)
        self._flush_tail()
        log.info("store %s: %d frames of the intake log recorded (the gateway stopped "
                 "before it recorded them itself)", self.path, n)

    def _check_schema(self, db: sqlite3.Connection) -> None:
        check_layout(self.path, db)

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._settle(now=True)
            except sqlite3.Error as e:  # (disk full): those batches are sent again next time
                log.warning("store %s: deliveries not recorded at close (%s); the intake "
                            "log keeps its frames", self.path, e)
            try:
                self.out.write_history(force=True)
            except sqlite3.Error as e:  # (disk full): the frames are resolved again next time
                log.warning("store %s: history not saved at close (%s)", self.path, e)
            self._db.close()
            self._db = None
        if self._log is not None:
            self._log.close()

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    @property
    def cache(self) -> Cache:
        return self.out.cache

    def transaction(self, fn: Callable[[sqlite3.Connection], None],
                     durable: bool = True) -> None:
        """fn in one transaction. Not durable (synchronous=NORMAL, no fsync of its own): for
        what a power cut may undo harmlessly — the WAL is written in order, so the next
        durable commit (a frame's) makes it durable too."""
        db = self.db
        if not durable:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                fn(db)
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (disk full, I/O error): a second
                # ROLLBACK would fail and hide the real error
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            if not durable:
                db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")

    async def windows(self) -> dict[str, Window]:
        """Each node's window with the highest sequence (third-party adverts: their only one)."""
        out: dict[str, Window] = {}
        for (node, _), w in (await self.key_windows()).items():
            if node not in out or w.high > out[node].high:
                out[node] = w
        return out

    async def key_windows(self) -> dict[tuple[str, bytes], Window]:
        """Every replay window, by (node, key id); key id b"": none."""
        return await self._run(self._key_windows)  # type: ignore[no-any-return]

    def _key_windows(self) -> dict[tuple[str, bytes], Window]:
        rows = self.db.execute("SELECT node, key_id, high, window FROM windows").fetchall()
        return {(node, bytes(key)): Window(high, _from_sql(bits), bytes(key))
                for node, key, high, bits in rows}

    async def adopt_keys(self, keys: dict[str, bytes]) -> None:
        """Windows kept before they had a key (layout 2) belong to the key configured now."""
        def work(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE windows SET key_id = ? WHERE node = ? AND key_id = x''",
                           [(k, node) for node, k in keys.items()])
            db.executemany("UPDATE nodes SET key_id = ? WHERE node = ? AND key_id IS NULL",
                           [(k, node) for node, k in keys.items()])

        await self._run(self.transaction, work)

    # ---- the ACK path

    async def commit(self, frames: Sequence[Accepted], windows: dict[str, Window]) -> None:
        await self._run(self._commit, frames, windows)

    def _commit(self, frames: Sequence[Accepted], windows: dict[str, Window]) -> None:
        if self._use_log() and self._log_commit(frames, windows):
            return
        # SQLite holds the tail before anything is inserted after it (ids ascend): the
        # round ends here
        if self.tail.rows or self.tail.high:
            self._settle(now=True)
        self._next_id = 0
        now = time.time()
        self._collided = []
        self.cap.make_room(self.db)  # before inserting, so freed pages are reused, not added

        def work(db: sqlite3.Connection) -> None:
            rows = []
            dead = []
            touched: dict[str, int] = {}
            for f in frames:
                if f.pack is not None:
                    rows.append((f.node, f.seq, now, f.n, PACK, f.pack))
                elif f.records is not None:
                    rows.append((f.node, f.seq, now, len(f.records), RECORDS,
                                 dumps(f.records)[1:-1].encode()))
                else:
                    dead.append((f.node, f.seq, f.reason, now, "cose", f.cose))
                touched[f.node] = touched.get(f.node, 0) + 1
            # OR IGNORE: a frame already queued is the same frame again
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO frames (node, seq, received_at, readings,"
                           " format, body) VALUES (?, ?, ?, ?, ?, ?)", rows)
            if db.total_changes - before < len(rows):
                dead += self._collisions(db, rows)
            if dead:
                db.executemany("INSERT INTO dead_letters (node, seq, reason, received_at, kind,"
                               " body) VALUES (?, ?, ?, ?, ?, ?)", dead)
                self.cap.trim_dead(db)  # their own bound: never the room of other frames
            _record_windows(db, [(node, windows[node].key, windows[node].high,
                                  windows[node].bits) for node in touched],
                            {node: (now, n) for node, n in touched.items()})

        self.transaction(work)
        self.out.reports.extend(self._collided)
        self._collided = []
        # at the high mark now: pause before more frames are taken. The frames are committed
        # whatever happens here, so a failure must not look like a failed commit (their ACKs
        # would be held back): the next commit tries again, before it inserts
        try:
            # at the cap, the delivered frames go first, before anything is evicted or paused
            self._settle(now=bool(self.cap.max_bytes and self.cap.live_bytes > self.cap.low))
            self.cap.make_room(self.db)
        except sqlite3.Error as e:
            log.warning("store %s: frames committed, but recording deliveries or making room "
                        "after them failed (%s); tried again after the next commit", self.path, e)

    @property
    def _shrink(self) -> bool:
        return 0 < self.cap.max_bytes < LOG_SHRINK_BELOW

    def _use_log(self) -> bool:
        # under a disk cap the round's log counts: both hold the frames until it ends
        logged = 0 if self._log is None else self._log.appended
        if not (INTAKE_LOG and self._deliver_every > 0 and len(self.tail) < TAIL_HARD
                and not (self.cap.max_bytes and self.cap.live_bytes + logged > self.cap.low)):
            return False
        if self._log is not None and self._log.broken:  # (its tail is in SQLite: empty)
            try:
                self._log.restart(shrink=self._shrink)
            except OSError:
                return False  # SQLite takes the frames meanwhile
        return True

    def _log_commit(self, frames: Sequence[Accepted], windows: dict[str, Window]) -> bool:
        """The group on the intake log (synced) and in the tail; False if it must go into
        SQLite instead: a dead letter, or a frame the queue already holds (the same frame
        again, or a collision), which only SQLite's rules settle."""
        db = self.db
        now = time.time()
        if not self._next_id:
            self._next_id = 1 + max(
                db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence"
                           " WHERE name = 'frames'").fetchone()[0],
                db.execute("SELECT coalesce(max(last_id), 0) FROM sink_cursors").fetchone()[0],
                db.execute("SELECT coalesce(max(id), 0) FROM frames").fetchone()[0],
                self.tail.high)
        rows: list[Row] = []
        seen: set[tuple[str, int]] = set()
        for f in frames:
            key = (f.node, f.seq)
            if (key in seen or key in self.tail.keys or (f.pack is None and f.records is None)
                    or db.execute("SELECT 1 FROM frames WHERE node = ? AND seq = ?",
                                  key).fetchone() is not None):
                return False
            seen.add(key)
            if f.pack is not None:
                fmt, body = PACK, f.pack
            else:
                fmt, body = RECORDS, dumps(f.records)[1:-1].encode()
            rows.append((self._next_id + len(rows), f.node, f.seq, now, f.readings, fmt, body))
        wrows: list[WindowRow] = [(node, windows[node].key, windows[node].high,
                                   windows[node].bits) for node in {f.node for f in frames}]
        if self._log is None:
            self._log = IntakeLog(self.path.with_name(self.path.name + INTAKE_SUFFIX),
                                  sync=SYNCHRONOUS != "OFF")
        try:
            if self._log.epoch == 0:
                self._log.open()
            self._log.append(rows, wrows)
        except OSError as e:  # (disk full, I/O error): as a failed SQLite commit is told
            raise sqlite3.OperationalError(f"intake log {self._log.path}: "
                                           f"{e.strerror or e}") from e
        if not self.tail.rows:
            self._tail_since = time.monotonic()
        self.tail.add(rows, wrows)
        self._next_id += len(rows)
        # committed whatever happens next: a failure must not look like a failed commit
        try:
            self._settle()
        except sqlite3.Error as e:
            log.warning("store %s: frames committed to the intake log, but recording the "
                        "round in the queue failed (%s); tried again after the next commit",
                        self.path, e)
        return True

    def _flush_tail(self) -> None:
        """The tail into SQLite in one transaction (synced), then the log starts over."""
        tail = self.tail
        if self._log is None or not (tail.rows or tail.windows or tail.high):
            return
        rows = list(tail.rows.values())
        windows = [(node, key, high, bits) for (node, key), (high, bits) in tail.windows.items()]

        def work(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO frames (id, node, seq, received_at, readings,"
                           " format, body) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            # ids given to frames that left before SQLite saw them: never given again
            if tail.high and not db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?)"
                                            " WHERE name = 'frames'", (tail.high,)).rowcount:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('frames', ?)",
                               (tail.high,))
            _record_windows(db, windows, tail.seen)

        self.transaction(work)
        tail.clear()
        try:
            self._log.restart(shrink=self._shrink)
        except OSError as e:  # its records are in SQLite now: read again, they change nothing
            log.warning("store %s: the intake log could not start over (%s)", self.path, e)
        # the round's pages into the database now, while they are few (and in the figure
        # bench/disk_wear.py measures), not at SQLite's 1000th WAL page
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.cap.make_room(self.db)  # the queue grew by the round: the cap's rules, as ever

    def _collisions(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]
                    ) -> list[tuple[Any, ...]]:
        """Dead letters for new frames whose (node, seq) is still queued with another body.

        Only a node whose key changed (provisioned again: its sequence started over) sends
        them while frames of its old key wait for a sink; kept and reported, never dropped.
        """
        dead = []
        for node, seq, now, _, _, body in rows:
            row = db.execute("SELECT body FROM frames WHERE node = ? AND seq = ?",
                             (node, seq)).fetchone()
            if row is not None and bytes(row[0]) != body:
                why = (f"seq {seq} is still queued from before the node's key changed; kept "
                       "here, not sent (the node must count on above its old sequence)")
                dead.append((node, seq, f"seq_collision: {why}", now, "pack", body))
                self._collided.append((node, seq, "seq_collision", why))
        return dead

    # ---- the forward stage (batches.py, on this thread; forward.py drives it per sink)

    async def next_batch(self, max_records: int, after_id: int = 0) -> Batch | None:
        """Whole frames after `after_id`, up to max_records readings (None: nothing waits)."""
        return await self._run(  # type: ignore[no-any-return]
            self.out.next_batch, max_records, after_id)

    async def delivered(self, batch: Batch) -> None:
        await self._run(self.out.delivered, batch)

    async def cursor(self, sink: str) -> int:
        """The last frame id this sink has confirmed (0: none yet)."""
        return await self._run(self.out.cursor, sink)  # type: ignore[no-any-return]

    async def delivered_to(self, sink: str, batch: Batch, sinks: Sequence[str]) -> None:
        """Advance one sink's cursor; frames every configured sink has leave the queue."""
        await self._run(self._delivered_to, sink, batch, tuple(sinks))

    @property
    def _deliver_every(self) -> float:
        return DELIVER_EVERY_S if self.deliver_every_s is None else self.deliver_every_s

    def _delivered_to(self, sink: str, batch: Batch, sinks: tuple[str, ...]) -> None:
        if self._deliver_every <= 0:
            self.out.delivered_to(sink, batch, sinks)
            return
        if not self._owed:
            self._owed_since = time.monotonic()
        old = self._owed.get(sink)
        folded = [] if old is None else old[2] + ([old[0]] if old[0] is not batch else [])
        self._owed[sink] = (batch, sinks, folded)
        self._owed_frames += len(batch.json_items)
        # a backlog draining (after an outage, or after a restart that found deliveries
        # unrecorded) is recorded every OWED_FRAMES_MAX frames. Pacing is for a street's
        # trickle; a gateway restarting more often than deliver_every_s would otherwise never
        # record one, and send its whole queue again at every start
        # and at once while the queue is over its cap's low mark: the frames delivered but not
        # recorded hold the room intake waits for (pause_intake stops the commits that would
        # otherwise settle them)
        self._settle(now=self._owed_frames >= OWED_FRAMES_MAX
                     or bool(self.cap.max_bytes and self.cap.live_bytes > self.cap.low))

    def _settle(self, now: bool = False) -> None:
        """End the round if deliver_every_s has passed since it began (now: whatever the
        time): record the deliveries owed, then the tail into SQLite (the frames every sink
        has by then are left out: they only enter the history)."""
        tail = self.tail.rows or self.tail.high
        if not (self._owed or tail):
            return
        since = min(t for t, busy in ((self._owed_since, self._owed), (self._tail_since, tail))
                    if busy)
        if not (now or time.monotonic() - since >= self._deliver_every
                or len(self.tail) >= TAIL_MAX
                or (self._log is not None and self._log.appended >= LOG_MAX)):
            return
        self._record_owed()
        self._flush_tail()

    def _record_owed(self) -> None:
        for sink in list(self._owed):
            batch, sinks, folded = self._owed[sink]
            self.out.delivered_to(sink, batch, sinks)
            del self._owed[sink]  # (a failure above keeps it owed: tried again next time)
            for b in folded:
                self.cap.release(b.first_id, b.last_id)
        self._owed_frames = 0

    async def limit(self, max_bytes: int, policy: str) -> None:
        """Cap the queue's bytes on disk (0: no cap); policy pause_intake or evict_oldest."""
        await self._run(self.cap.configure, self.db, max_bytes, policy)

    async def depth(self) -> tuple[int, float | None]:
        """Readings waiting, and the age in seconds of the oldest one."""
        return await self._run(self._depth)  # type: ignore[no-any-return]

    def _floor(self) -> int:
        """Frames up to this id are delivered, if not yet recorded (deliver_every_s): they
        are not waiting. (Reads never record them: a scrape every 15 s would undo the pacing.)"""
        owed = [(batch.last_id, sinks) for batch, sinks, _ in self._owed.values()]
        if not owed or set(owed[0][1]) - set(self._owed):
            return 0
        return min(last for last, _ in owed)

    def _depth(self) -> tuple[int, float | None]:
        floor = self._floor()
        n = self.db.execute("SELECT coalesce(sum(readings), 0) FROM frames WHERE id > ?",
                            (floor,)).fetchone()[0]
        oldest = self.db.execute(
            "SELECT received_at FROM frames WHERE id > ? ORDER BY id LIMIT 1",
            (floor,)).fetchone()
        tail_n, _, tail_oldest = self.tail.waiting(floor)
        oldest = oldest[0] if oldest else tail_oldest  # (the tail is newer than SQLite's)
        return int(n) + tail_n, (time.time() - oldest) if oldest is not None else None

    # ---- read-only views for the local API (history.py holds the SQL of the recent table)

    async def recent(self, node: str, since: float, limit: int, name: str | None = None
                     ) -> tuple[list[dict[str, Any]], bool, list[float]]:
        """A node's recent readings after `since`, whether more remain, and its sample times."""
        def q() -> tuple[list[dict[str, Any]], bool, list[float]]:
            self.out.history_now()
            rows, more = self.history.readings(self.db, node, since, limit, name)
            return rows, more, self.history.sample_times(self.db, node, since)
        return await self._run(q)  # type: ignore[no-any-return]

    async def overview(self) -> dict[str, Any]:
        """Queue depth and bytes, oldest age, per-node last seen and newest values."""
        return await self._run(self._overview)  # type: ignore[no-any-return]

    def _overview(self) -> dict[str, Any]:
        self.out.history_now()
        db = self.db
        floor = self._floor()
        n, size = db.execute("SELECT coalesce(sum(readings), 0), coalesce(sum(length(body)), 0)"
                             " FROM frames WHERE id > ?", (floor,)).fetchone()
        tail_n, tail_size, _ = self.tail.waiting(floor)
        n, size = n + tail_n, size + tail_size
        _, oldest = self._depth()
        nodes = {node: {"last_seen": last, "frames": frames} for node, last, frames in
                 db.execute("SELECT node, last_seen, frames FROM nodes")}
        for node, (last, taken) in self.tail.seen.items():  # (this round's: not in SQLite yet)
            had = nodes.get(node, {"last_seen": last, "frames": 0})
            nodes[node] = {"last_seen": max(had["last_seen"], last),
                           "frames": had["frames"] + taken}
        return {"queue_readings": n, "queue_bytes": size, "oldest_age_s": oldest,
                "nodes": nodes, "latest": self.history.latest(),
                "intervals": {node: typical_interval(self.history.last_times(db, node))
                              for node in nodes},
                "dead_letters": db.execute("SELECT count(*) FROM dead_letters").fetchone()[0],
                "recent_rows": self.history.rows(db)}

