"""The queue's file: its tables, its layout number, and the layouts it is moved from.

`queue.sqlite` in the gateway's state_dir. A layout this gateway does not keep is refused with
what to do (`check_layout`); layouts 2 and 3 are moved to 4 in place when the store opens the
file (`migrate`).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("lantern.store")

# PRAGMA user_version; 0 (never numbered): a row per reading; 2: nodes without key_id; 3: one
# replay window per node, with its key's id; 4: a window per (node, key) in `windows`, so a
# key that comes back finds its own. 2 and 3 are moved to 4 in place (migrate).
SCHEMA_VERSION = 4
QUEUE_FILE = "queue.sqlite"  # the queue's name in the gateway's state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    -- AUTOINCREMENT: ids are never reused, so a delivery cursor can never skip a frame
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at REAL NOT NULL,
    readings INTEGER NOT NULL,  -- records in it
    format INTEGER NOT NULL,  -- 0: SenML CBOR pack, MAC checked; 1: SenML-JSON records
    body BLOB NOT NULL,
    UNIQUE (node, seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,  -- body is the 'cose' message (refused on arrival) or its 'pack'
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_cursors (
    -- each sink's last delivered frame id: a slow sink never holds back another
    sink TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    -- the node's window with the highest sequence, of any key: high is the highest sequence
    -- the node id used (lantern provision starts a new key above it)
    high INTEGER NOT NULL,
    window INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    frames INTEGER NOT NULL,
    key_id BLOB  -- protocol.key_id of the key that window is kept under (NULL: none given)
);
"""
_WINDOWS_TABLE = """
CREATE TABLE IF NOT EXISTS windows (
    -- every replay window, one per (node, key) the node was ever taken under: a retired key
    -- brought back gets its own window back, never a fresh one (docs/gateway.md)
    node TEXT NOT NULL,
    key_id BLOB NOT NULL,  -- protocol.key_id; x'': none (third-party adverts; a window kept
                           -- before windows had a key, until Ingest.start adopts it)
    high INTEGER NOT NULL,
    window INTEGER NOT NULL,
    PRIMARY KEY (node, key_id)
) WITHOUT ROWID
"""
SCHEMA += _WINDOWS_TABLE + ";\n"


def migrate(db: sqlite3.Connection) -> None:
    """Layouts 2 and 3 → 4, in place and in one transaction: nodes gains key_id (layout 2;
    NULL until Ingest.start adopts the keys configured now), and every window kept in nodes
    becomes its key's row in `windows` (no window is lost or changed). A gateway of layout 2
    or 3 then refuses the file as newer."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "nodes" not in tables or "windows" in tables:
        return  # a new queue, or one of this layout
    columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
    was = 3 if "key_id" in columns else 2
    db.execute("BEGIN IMMEDIATE")
    try:
        if was == 2:
            db.execute("ALTER TABLE nodes ADD COLUMN key_id BLOB")
        db.execute(_WINDOWS_TABLE)
        moved = db.execute("INSERT INTO windows SELECT node, coalesce(key_id, x''), high, window"
                           " FROM nodes").rowcount
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    log.info("store: layout %d moved to layout %d (%d replay windows, each now kept per "
             "node and key)", was, SCHEMA_VERSION, moved)


def check_layout(path: Path, db: sqlite3.Connection | None = None) -> None:
    """ConfigError if the queue at `path` has a layout this gateway does not keep."""
    if db is None:
        if not path.exists():
            return
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check_layout(path, conn)
        finally:
            conn.close()
        return
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version in (2, 3, SCHEMA_VERSION) or (version == 0 and "readings" not in tables):
        return  # (2 and 3 are moved to 4 in place when the store opens it)
    made_by = ("an earlier Lantern (a row per reading)" if version == 0
               else f"a newer Lantern (layout {version})" if version > SCHEMA_VERSION
               else f"an unknown layout {version}")
    raise ConfigError(
        f"{path}: this queue was written by {made_by}; this gateway keeps layout "
        f"{SCHEMA_VERSION} (a row per frame) and does not convert it. Nothing was changed. "
        "Let the version that wrote it deliver its queue first, then move the file away "
        "(or move it away now: the readings still queued in it are then not sent)")
