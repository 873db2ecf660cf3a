"""The health state and the alert outbox, durable in their own SQLite file in the state dir.

One transaction holds a feed's new state (open conditions, counts, switching, energy) and
the notifications its events owe each target, committed with synchronous=FULL as the queue
commits readings: after a restart no condition is raised again and no notification is lost.
A notification leaves the outbox only once its target confirmed it (`done`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "health.sqlite"
# Notifications kept per target while it does not take them (days of a receiver down and a
# flapping node): beyond MAX_OUTBOX, the oldest go, counted. From FOLD_FROM waiting, a resolved
# whose firing was never tried folds with it into nothing (the receiver never heard of that
# alert; counted), so one alert costs at most a resolved and a firing there, and the cap is
# reached only by very many alerts. Below FOLD_FROM every raise and clear goes out.
MAX_OUTBOX = 1000
FOLD_FROM = 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS health_state (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    body TEXT NOT NULL,      -- the notification, byte for byte as it is sent (and resent)
    tries INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alert_outbox_target ON alert_outbox (target, id);
"""


@dataclass(frozen=True)
class Pending:
    id: int
    target: str
    body: str
    tries: int


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HealthStore:
    """Blocking: call it from a thread of its own (service.py does), never the event loop."""

    def __init__(self, state_dir: Path, max_outbox: int = MAX_OUTBOX,
                 fold_from: int = FOLD_FROM) -> None:
        self.path = Path(state_dir) / FILE
        self.max_outbox = max_outbox
        self.fold_from = fold_from
        self._db: sqlite3.Connection | None = None
        self.sending: set[int] = set()  # notifications a target has now: never folded or dropped
        self.coalesced: Counter[str] = Counter()  # by target: folded away (a firing + resolved)
        self.dropped: Counter[str] = Counter()  # by target: the oldest, over max_outbox

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            if new:
                _sync_dir(self.path.parent)  # the file's name is durable too
        except BaseException:
            db.close()
            raise
        self._db = db

    def move_aside(self) -> Path:
        """Close and rename a damaged file (with its WAL) out of the way; a fresh one is
        made by the next open(). Returns the name it has now."""
        self.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{FILE}.damaged-{stamp}")
        for suffix in ("-wal", "-shm", ""):
            src = self.path.with_name(FILE + suffix)
            if src.exists():
                src.replace(aside.with_name(aside.name + suffix))
        _sync_dir(self.path.parent)
        return aside

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "health store is not open"
        return self._db

    def load(self) -> dict[str, Any]:
        row = self.db.execute("SELECT body FROM health_state WHERE id = 1").fetchone()
        if row is None:
            return {}
        state: dict[str, Any] = json.loads(row[0])
        return state

    def save(self, state: dict[str, Any], notes: list[tuple[str, str]]) -> None:
        """The new state and (target, body) notifications, in one durable transaction."""
        db = self.db
        coalesced: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO health_state (id, body) VALUES (1, ?) ON CONFLICT (id) "
                       "DO UPDATE SET body = excluded.body",
                       (json.dumps(state, separators=(",", ":"), allow_nan=False),))
            waiting = self.waiting() if notes else {}
            for target, text in notes:
                if waiting.get(target, 0) >= self.fold_from and self._fold(target, text):
                    coalesced[target] += 2
                    waiting[target] -= 1
                else:
                    db.execute("INSERT INTO alert_outbox (target, body) VALUES (?, ?)",
                               (target, text))
                    waiting[target] = waiting.get(target, 0) + 1
            for target in {t for t, _ in notes}:
                dropped[target] += self._cap(target)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.coalesced.update(coalesced)
        self.dropped.update(+dropped)

    def _fold(self, target: str, text: str) -> bool:
        """A resolved whose firing was never tried: delete that firing, insert nothing."""
        try:
            alert = json.loads(text)["alerts"][0]
            if alert["status"] != "resolved":
                return False
        except (ValueError, TypeError, KeyError, IndexError):
            return False  # not one of ours: kept as it is
        row = self.db.execute(
            "SELECT id FROM alert_outbox WHERE target = ? AND tries = 0 "
            "AND json_extract(body, '$.alerts[0].status') = 'firing' "
            "AND json_extract(body, '$.alerts[0].fingerprint') = ? "
            "AND json_extract(body, '$.alerts[0].startsAt') = ? ORDER BY id DESC LIMIT 1",
            (target, alert["fingerprint"], alert["startsAt"])).fetchone()
        if row is None or row[0] in self.sending:
            return False
        self.db.execute("DELETE FROM alert_outbox WHERE id = ?", (row[0],))
        return True

    def _cap(self, target: str) -> int:
        """Delete the target's oldest notifications beyond max_outbox; how many."""
        (n,) = self.db.execute("SELECT COUNT(*) FROM alert_outbox WHERE target = ?",
                               (target,)).fetchone()
        over = n - self.max_outbox
        if over <= 0:
            return 0
        ids = [i for (i,) in self.db.execute(
            "SELECT id FROM alert_outbox WHERE target = ? ORDER BY id LIMIT ?",
            (target, over + len(self.sending))) if i not in self.sending][:over]
        self.db.executemany("DELETE FROM alert_outbox WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def due(self, target: str, now: float, limit: int = 32) -> list[Pending]:
        """The target's oldest notifications, in order, up to the first not due yet (one
        waiting for its retry holds back those after it: they go out in order)."""
        rows = self.db.execute(
            "SELECT id, target, body, tries, next_at FROM alert_outbox WHERE target = ? "
            "ORDER BY id LIMIT ?", (target, limit)).fetchall()
        out = []
        for note_id, tgt, text, tries, next_at in rows:
            if next_at > now:
                break
            out.append(Pending(note_id, tgt, text, tries))
        return out

    def next_at(self, target: str) -> float | None:
        """When the target's oldest notification is due (None: nothing waits)."""
        row = self.db.execute("SELECT next_at FROM alert_outbox WHERE target = ? ORDER BY id "
                              "LIMIT 1", (target,)).fetchone()
        return None if row is None else float(row[0])

    def done(self, note_id: int) -> None:
        self.db.execute("DELETE FROM alert_outbox WHERE id = ?", (note_id,))

    def retry(self, note_id: int, next_at: float) -> None:
        self.db.execute("UPDATE alert_outbox SET tries = tries + 1, next_at = ? WHERE id = ?",
                        (next_at, note_id))

    def waiting(self) -> dict[str, int]:
        return dict(self.db.execute(
            "SELECT target, COUNT(*) FROM alert_outbox GROUP BY target").fetchall())
