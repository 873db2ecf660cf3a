"""The fleet registry: every node the gateway knows, as one record (docs/fleet.md).

id, pole, location, board, firmware version, key id (and how many keys it has had), config
version, and a state: provisioned (a key, no frame yet), active, silent (no frame for three
intervals), revoked. Kept in `state_dir/registry.sqlite` (0600), beside the queue but not in
it. SQLite, not a JSON file, because two writers share it: the running gateway (last seen,
firmware) and `lantern gateway nodes import|revoke`. Each change is its own transaction under
SQLite's file lock, touching its own rows; a JSON file would be rewritten whole by whichever
writer came last, and could lose the other's node.

A key the registry has retired (replaced by re-provisioning) or a revoked node's key is never
handed to ingest again: `KeyView` refuses it, so frames recorded before a wipe stay refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import load_keys
from .errors import ConfigError, LanternError
from .ngsi import NodeMeta

if TYPE_CHECKING:
    from .protocol import Mac0, NodeKey

log = logging.getLogger("lantern.registry")

REGISTRY_FILE = "registry.sqlite"
SILENT_INTERVALS = 3  # no frame for this many sampling intervals: silent
# a node's last-seen time is written at most this often (SD-card wear); the gateway's own
# view is always the newest (Registry.live), this is what another process or a restart reads
SEEN_WRITE_S = 3600.0
STATES = ("provisioned", "active", "silent", "revoked")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, pole TEXT NOT NULL DEFAULT '', lat REAL, lon REAL,
    board TEXT NOT NULL DEFAULT '', firmware TEXT, key_id TEXT,
    config_version INTEGER NOT NULL DEFAULT 0, interval_s REAL NOT NULL DEFAULT 60,
    provisioned REAL, last_seen REAL, revoked REAL, revoked_why TEXT);
CREATE TABLE IF NOT EXISTS retired (
    node TEXT NOT NULL, key_id TEXT NOT NULL, at REAL NOT NULL, why TEXT NOT NULL,
    PRIMARY KEY (node, key_id));
CREATE TABLE IF NOT EXISTS rotations (
    node TEXT PRIMARY KEY, base TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 0,
    key BLOB, prev BLOB, first_new INTEGER, next BLOB, next_version INTEGER,
    requested REAL, outcome TEXT, at REAL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, settings TEXT NOT NULL, at REAL NOT NULL);
"""
# columns added since the first registries were written: (name, declaration)
_ADDED = (("grp", "TEXT NOT NULL DEFAULT ''"), ("config_refused", "TEXT"))


class RegistryError(LanternError):
    """A registry change refused (a clash, an unknown node); the message says why and how."""


def key_id(key: bytes) -> str:
    """A key's public name (16 hex digits), as the node and the key file comments name it."""
    return hashlib.sha256(b"lantern key id v1" + key).digest()[:8].hex()


@dataclass(frozen=True)
class Rotation:
    """A node's live key rotations (agent/fleetops.py): the key it seals with now when that is
    no longer the key file's, the one before it (taken for DATA frames below `first_new`),
    and a next key agreed and not committed yet."""

    node: str
    base: str  # key id of the key-file key the rotations started from (re-provisioning ends them)
    version: int = 0  # the node's key version (0: the provisioned key), as its STATUS says
    key: bytes | None = None
    prev: bytes | None = None
    first_new: int | None = None  # the first frame sequence sealed with `key`
    next: bytes | None = None
    next_version: int | None = None
    requested: float | None = None  # a rotation asked for (`lantern gateway rekey`), not done
    outcome: str | None = None  # "done", or why the last attempt failed
    at: float | None = None


@dataclass(frozen=True)
class Group:
    """Settings for a group of nodes, versioned: a node on another version is drifting."""

    name: str
    version: int
    settings: dict[str, Any]
    at: float


@dataclass(frozen=True)
class NodeRecord:
    id: str
    pole: str = ""
    lat: float | None = None
    lon: float | None = None
    board: str = ""
    firmware: str | None = None
    key_id: str | None = None
    key_version: int = 1  # keys the node has had: retired ones + the current one
    config_version: int = 0
    interval_s: float = 60.0
    provisioned: float | None = None
    last_seen: float | None = None
    revoked: float | None = None
    revoked_why: str | None = None
    retired: tuple[str, ...] = ()  # key ids retired for this node
    group: str = ""
    config_refused: str | None = None  # "vN: why" when the node refused its group's settings
    config_want: int | None = None  # its group's config version
    key_rotation: int = 0  # the node's own key version (0: the provisioned key)
    rekey: str | None = None  # the last rotation's outcome, "requested" while one waits

    @property
    def config_drift(self) -> bool:
        """On another config version than its group's, or refusing it (revoked: no)."""
        return self.revoked is None and self.config_want is not None and (
            self.config_version != self.config_want or self.config_refused is not None)

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.last_seen is None:
            return "provisioned"
        return "active" if now - self.last_seen <= SILENT_INTERVALS * self.interval_s \
            else "silent"

    def row(self, now: float) -> dict[str, object]:
        """The record as /api/nodes and the CSV export give it."""
        return {"id": self.id, "pole": self.pole, "lat": self.lat, "lon": self.lon,
                "board": self.board, "firmware": self.firmware, "key_id": self.key_id,
                "key_version": self.key_version, "config_version": self.config_version,
                "state": self.state(now), "last_seen": self.last_seen,
                "revoked": self.revoked, "revoked_why": self.revoked_why,
                "group": self.group, "config_want": self.config_want,
                "config_drift": self.config_drift, "config_refused": self.config_refused,
                "key_rotation": self.key_rotation, "rekey": self.rekey}


CSV_FIELDS = ("id", "pole", "lat", "lon", "board", "firmware", "key_id", "key_version",
              "config_version", "state", "last_seen", "revoked", "revoked_why", "group",
              "config_want", "config_drift", "config_refused", "key_rotation", "rekey")
# what /api/nodes adds to each node from its record (agent/api.py)
API_FIELDS = ("pole", "board", "key_id", "key_version", "config_version", "state", "revoked",
              "revoked_why", "group", "config_want", "config_drift", "config_refused",
              "key_rotation", "rekey")


class Registry:
    """The registry file. Blocking (sqlite): the gateway calls it through asyncio.to_thread;
    `records`, `refusal` and `revoked` answer from memory (`refresh` reloads it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():  # 0600 from the start: it names keys (by id) and places
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False)
        # the gateway's threads (asyncio.to_thread: the fleet task, each node's rotation or
        # push) share this connection: one of them in it at a time
        self._lock = threading.RLock()
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(nodes)")}
        for col, decl in _ADDED:
            if col not in have:
                self._db.execute(f"ALTER TABLE nodes ADD COLUMN {col} {decl}")
        self._db.commit()
        self._version = -1
        self._bad_groups: set[tuple[str, str]] = set()  # (name, text) of group rows logged
        self._records: dict[str, NodeRecord] = {}
        self._rotations: dict[str, Rotation] = {}
        self._groups: dict[str, Group] = {}
        self._written: dict[str, float] = {}  # node → last_seen last written
        self.refresh()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE: no lost update)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()
            self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Reload the records if anyone (this process or another) changed the file."""
        with self._lock:
            return self._refresh(force)

    def _refresh(self, force: bool) -> bool:
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version and not force:
            return False
        retired: dict[str, list[str]] = {}
        for node, kid in self._db.execute("SELECT node, key_id FROM retired ORDER BY at"):
            retired.setdefault(node, []).append(kid)
        rcols = tuple(Rotation.__dataclass_fields__)
        self._rotations = {row[0]: Rotation(*row) for row in self._db.execute(
            f"SELECT {', '.join(rcols)} FROM rotations")}
        # each group's row alone: one edited by hand into bad JSON is reported once and
        # skipped (its nodes want no version), and the rest of the registry still reads
        groups: dict[str, Group] = {}
        for n, v, js, at in self._db.execute("SELECT name, version, settings, at FROM groups"):
            try:
                settings = json.loads(js)
                if not isinstance(settings, dict):
                    raise ValueError(f"not a JSON object: {type(settings).__name__}")
            except (TypeError, ValueError) as e:
                if (n, str(js)) not in self._bad_groups:
                    self._bad_groups.add((n, str(js)))
                    log.error("registry %s: group %r has unreadable settings (%s), skipped "
                              "until set again (lantern gateway group set)", self.path, n, e)
                continue
            groups[n] = Group(n, v, settings, at)
        self._groups = groups
        cols = ("id", "pole", "lat", "lon", "board", "firmware", "key_id", "config_version",
                "interval_s", "provisioned", "last_seen", "revoked", "revoked_why")
        recs = {}
        for row in self._db.execute(f"SELECT {', '.join(cols)}, grp, config_refused FROM nodes "
                                    "ORDER BY id"):
            r = NodeRecord(**dict(zip(cols, row[:-2], strict=True)), group=row[-2],
                           config_refused=row[-1])
            old = tuple(retired.get(r.id, ()))
            g, rot = self._groups.get(r.group), self._rotations.get(r.id)
            recs[r.id] = replace(r, retired=old, key_version=len(old) + 1,
                                 config_want=g.version if g else None,
                                 key_rotation=rot.version if rot else 0,
                                 rekey=rot.outcome if rot else None)
        self._records = recs
        self._version = version  # (only now: a refresh that raised is tried again)
        return True

    # ---- reads (memory)

    def records(self) -> list[NodeRecord]:
        return list(self._records.values())

    def get(self, node: str) -> NodeRecord | None:
        return self._records.get(node)

    def revoked(self, node: str) -> bool:
        r = self._records.get(node)
        return r is not None and r.revoked is not None

    def refusal(self, node: str, key: bytes) -> str | None:
        """Why frames of `node` under `key` are refused ("revoked", "retired"), or None."""
        r = self._records.get(node)
        if r is None:
            return None
        if r.revoked is not None:
            return "revoked"
        kid = key_id(key)
        if kid in r.retired and kid != r.key_id:
            return "retired"
        return None

    def rotation(self, node: str) -> Rotation | None:
        return self._rotations.get(node)

    def groups(self) -> list[Group]:
        return sorted(self._groups.values(), key=lambda g: g.name)

    def group(self, name: str) -> Group | None:
        return self._groups.get(name)

    def overlay(self, keys: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """The key file's keys with each node's rotated key in place of the key it was
        rotated from (a key file with another key: the node was provisioned again)."""
        out = dict(keys)
        for kid, key in keys.items():
            rot = self._rotations.get(kid.decode("utf-8", "replace"))
            if rot is not None and rot.key is not None and rot.base == key_id(key):
                out[kid] = rot.key
        return out

    # ---- writes

    def sync_keys(self, keys: Mapping[bytes, bytes], now: float | None = None) -> list[str]:
        """Records for the key file's nodes: a new node is provisioned; a key the record does
        not know becomes its key (the old one retired), unless it was retired before (a key
        file restored from a backup: refused by `refusal`). What changed, one line each."""
        now = time.time() if now is None else now
        out = []
        with self._tx() as db:
            for kid_bytes, key in keys.items():
                node, kid = kid_bytes.decode(), key_id(key)
                r = self._records.get(node)
                if r is None:
                    db.execute("INSERT INTO nodes (id, key_id, provisioned) VALUES (?, ?, ?)",
                               (node, kid, now))
                    out.append(f"{node}: added (key {kid})")
                elif r.key_id != kid and kid not in r.retired:
                    self._rekey(db, r, kid, "replaced in the key file", now)
                    out.append(f"{node}: key {kid} replaces {r.key_id} (retired)")
        return out

    @staticmethod
    def _rekey(db: sqlite3.Connection, r: NodeRecord, kid: str, why: str, now: float) -> None:
        if r.key_id:
            db.execute("INSERT OR IGNORE INTO retired VALUES (?, ?, ?, ?)",
                       (r.id, r.key_id, now, why))
        # a new key is a new node as far as revocation goes: re-provisioning un-revokes
        db.execute("UPDATE nodes SET key_id = ?, provisioned = ?, revoked = NULL, "
                   "revoked_why = NULL, last_seen = NULL, config_version = 0, "
                   "config_refused = NULL WHERE id = ?", (kid, now, r.id))
        db.execute("DELETE FROM rotations WHERE node = ?", (r.id,))  # the node starts at 0

    def provisioned(self, node: str, kid: str, pole: str = "", lat: float | None = None,
                    lon: float | None = None, board: str = "", interval_s: float = 60.0,
                    now: float | None = None, group: str | None = None) -> None:
        """A node (re-)provisioned with key `kid`: its record made or updated, an old key
        retired. RegistryError if `kid` was retired for it (a stale fragment)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            r = self._records.get(node)
            if r is not None and kid in r.retired:
                raise RegistryError(f"{node}: key {kid} was retired on this gateway (the node "
                                    "was provisioned again since): an old fragment? provision "
                                    "the node again for a new key")
            if r is None:
                db.execute("INSERT INTO nodes (id, key_id, provisioned) VALUES (?, ?, ?)",
                           (node, kid, now))
            elif r.key_id != kid:
                self._rekey(db, r, kid, "re-provisioned", now)
            db.execute("UPDATE nodes SET pole = ?, lat = ?, lon = ?, board = ?, interval_s = ? "
                       "WHERE id = ?", (pole, lat, lon, board, interval_s, node))
            if group is not None:
                db.execute("UPDATE nodes SET grp = ? WHERE id = ?", (group, node))

    def revoke(self, node: str, why: str = "", now: float | None = None) -> NodeRecord:
        now = time.time() if now is None else now
        with self._tx() as db:
            if node not in self._records:
                raise RegistryError(f"no node {node!r} in {self.path} (`lantern gateway nodes` "
                                    "lists them)")
            db.execute("UPDATE nodes SET revoked = coalesce(revoked, ?), revoked_why = ? "
                       "WHERE id = ?", (now, why or "revoked by the operator", node))
        return self._records[node]

    # ---- key rotation (agent/fleetops.py)

    def request_rekey(self, nodes: list[str], now: float | None = None) -> None:
        """Rotations asked for: the gateway runs each when it next hears from the node."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for node in nodes:
                r = self._records.get(node)
                if r is None:
                    raise RegistryError(f"no node {node!r} in {self.path} (`lantern gateway "
                                        "nodes` lists them)")
                if r.revoked is not None:
                    raise RegistryError(f"{node} is revoked: provision it again instead")
                db.execute("INSERT INTO rotations (node, base) VALUES (?, ?) "
                           "ON CONFLICT (node) DO NOTHING", (node, r.key_id or ""))
                db.execute("UPDATE rotations SET requested = ?, outcome = 'requested', at = ? "
                           "WHERE node = ?", (now, now, node))

    def rekey_next(self, node: str, version: int, key: bytes, base: str) -> None:
        """The next key agreed with the node (REKEY answered), before the COMMIT."""
        with self._tx() as db:
            db.execute("INSERT INTO rotations (node, base) VALUES (?, ?) "
                       "ON CONFLICT (node) DO NOTHING", (node, base))
            db.execute("UPDATE rotations SET next = ?, next_version = ? WHERE node = ?",
                       (key, version, node))

    def rekey_done(self, node: str, version: int, old: bytes, first_new: int,
                   now: float | None = None) -> None:
        """The node seals with its next key from frame `first_new` on: it becomes current,
        `old` is kept for the frames before, and its key id retired. Called again with the
        exact `first_new` after a promotion by a frame (which only bounds it), it lowers it."""
        now = time.time() if now is None else now
        with self._tx() as db:
            # read under the lock: the COMMIT answer (a worker thread) and a frame under the
            # next key (the event loop) may both switch; the second must see the first's
            rot = self._rotations.get(node)
            if rot is None:
                raise RegistryError(f"{node}: no rotation under way")
            if rot.next is not None and rot.next_version == version:
                db.execute("INSERT OR IGNORE INTO retired VALUES (?, ?, ?, 'rotated')",
                           (node, key_id(old), now))
                db.execute("UPDATE nodes SET key_id = ? WHERE id = ?",
                           (key_id(rot.next), node))
                db.execute("UPDATE rotations SET key = next, prev = ?, version = ?, "
                           "first_new = ?, next = NULL, next_version = NULL, requested = NULL, "
                           "outcome = 'done', at = ? WHERE node = ?",
                           (old, version, first_new, now, node))
            elif rot.version == version and (rot.first_new is None or first_new < rot.first_new):
                db.execute("UPDATE rotations SET first_new = ? WHERE node = ?",
                           (first_new, node))

    def rekey_outcome(self, node: str, outcome: str, keep: bool = True,
                      drop_next: bool = False) -> None:
        """A rotation that did not finish: why; `keep` False drops the request (refused),
        `drop_next` the next key (a COMMIT refused: agreed again)."""
        with self._tx() as db:
            db.execute("UPDATE rotations SET outcome = ?, requested = CASE WHEN ? THEN "
                       "requested ELSE NULL END WHERE node = ?", (outcome, keep, node))
            if drop_next:
                db.execute("UPDATE rotations SET next = NULL, next_version = NULL "
                           "WHERE node = ?", (node,))

    # ---- groups

    def set_group(self, name: str, settings: Mapping[str, Any],
                  now: float | None = None) -> Group:
        """The group's settings, under a version above every version any node or group has
        had (a node moved to another group still takes its settings)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            top = max([g.version for g in self._groups.values()]
                      + [r.config_version for r in self._records.values()] + [0])
            db.execute("INSERT OR REPLACE INTO groups VALUES (?, ?, ?, ?)",
                       (name, top + 1, json.dumps(dict(settings), sort_keys=True), now))
        return self._groups[name]

    def assign(self, group: str, nodes: list[str]) -> None:
        """Put nodes in a group ("" takes them out)."""
        with self._tx() as db:
            for node in nodes:
                if node not in self._records:
                    raise RegistryError(f"no node {node!r} in {self.path} (`lantern gateway "
                                        "nodes` lists them)")
                db.execute("UPDATE nodes SET grp = ? WHERE id = ?", (group, node))

    def config_reported(self, node: str, version: int, refused: str | None = None) -> None:
        """The config version a node says it runs, and why it refused its group's, if so."""
        r = self._records.get(node)
        if r is None or (r.config_version, r.config_refused) == (version, refused):
            return
        with self._tx() as db:
            db.execute("UPDATE nodes SET config_version = ?, config_refused = ? WHERE id = ?",
                       (version, refused, node))

    def observe(self, seen: Mapping[str, float], firmware: Mapping[str, str],
                meta: Mapping[str, tuple[str, float | None, float | None, float]] = {}
                ) -> None:
        """What the gateway learnt: frames taken (last seen, written at most every
        SEEN_WRITE_S, every node's together; a new node's at once), firmware versions, and
        the [nodes] table's place and interval (pole, lat, lon, interval_s) where the config
        sets them."""
        changes: list[tuple[str, tuple[object, ...]]] = []
        newer = {node: t for node, t in seen.items() if (r := self._records.get(node)) is not None
                 and t > self._written.get(node, r.last_seen or 0.0)}
        # once one node's is due, every node's newer time goes in the same transaction: a
        # street's nodes, each due at its own moment, would otherwise cost one each. A node
        # never seen before is due at once (an installer waits for it to turn active)
        if any(t - self._written.get(node, self._records[node].last_seen or 0.0) >= SEEN_WRITE_S
               for node, t in newer.items()):
            for node, t in newer.items():
                changes.append(("UPDATE nodes SET last_seen = max(coalesce(last_seen, 0), ?) "
                                "WHERE id = ?", (t, node)))
                self._written[node] = t
        for node, fw in firmware.items():
            r = self._records.get(node)
            if r is not None and r.firmware != fw:
                changes.append(("UPDATE nodes SET firmware = ? WHERE id = ?", (fw, node)))
        for node, (pole, lat, lon, interval) in meta.items():
            r = self._records.get(node)
            if r is not None and (r.pole, r.lat, r.lon, r.interval_s) != (
                    pole or r.pole, lat if lat is not None else r.lat,
                    lon if lon is not None else r.lon, interval):
                changes.append(("UPDATE nodes SET pole = ?, lat = ?, lon = ?, interval_s = ? "
                                "WHERE id = ?", (pole or r.pole, r.lat if lat is None else lat,
                                                 r.lon if lon is None else lon, interval, node)))
        if changes:
            with self._tx() as db:
                for sql, args in changes:
                    db.execute(sql, args)

    def live(self, seen: Mapping[str, float]) -> list[NodeRecord]:
        """The records with this run's last-seen times (fresher than the file's)."""
        return [replace(r, last_seen=max(r.last_seen or 0.0, seen[r.id]))
                if r.id in seen else r for r in self._records.values()]


class KeyView(dict[bytes, bytes]):
    """The node keys ingest verifies with: the key file's (its contents), minus a revoked
    node's and a key the registry retired: a refused key is absent (None, KeyError, not
    `in`). Ingest asks `Fleet.refused` first on every frame (its `refused` hook), so such a
    frame is counted by its reason ("revoked", "retired") before any key is looked up."""

    def __init__(self, keys: Mapping[bytes, bytes], registry: Registry) -> None:
        super().__init__(keys)
        self.registry = registry

    def _check(self, kid: bytes, key: bytes) -> bool:
        return self.registry.refusal(kid.decode("utf-8", "replace"), key) is None

    def get(self, kid: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        key = super().get(kid)
        return key if key is not None and self._check(kid, key) else default

    def __getitem__(self, kid: bytes) -> bytes:
        key = self.get(kid)
        if key is None:
            raise KeyError(kid)
        return key

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, bytes) and self.get(kid) is not None

    def replace_all(self, keys: Mapping[bytes, bytes]) -> None:
        """The key file read again (a node imported while the gateway runs)."""
        self.clear()
        self.update(keys)


# How often the running gateway looks at the key file and the registry file. A look is two
# stat calls on the event loop; the registry's thread is used only when one of them changed
# or the gateway has something to write (an idle cabinet wakes for the timer alone: issue 22)
class LiveOps(Protocol):
    """The fleet's live operations as the registry's task drives them: agent/fleetops.py
    `FleetOps`, made by `Fleet.attach` (imported there, so that neither module imports the
    other when it loads)."""

    metrics: Any

    def heard(self, seen: Mapping[str, float]) -> None: ...
    def drift(self) -> int: ...
    def other_key(self, m: Mac0) -> NodeKey | None: ...
    async def idle(self) -> None: ...
    def close(self) -> None: ...


WATCH_EVERY_S = 2.0
Place = tuple[str, float | None, float | None, float]  # a node's pole, lat, lon, interval_s
# A file changed this recently may change again within the same mtime tick with the same
# size: it is read once more at the next look
_RECENT_NS = 1_000_000_000


class Fleet:
    """The registry in a running gateway: the key views handed to ingest and the links, the
    nodes' places for the sinks and the API, and a task (`run`) that keeps them current —
    the key file read again when it changes (`lantern gateway nodes import`), revocations
    and re-keys applied, what the gateway learnt written, Device entities pushed upstream."""

    def __init__(self, registry: Registry, keys_file: Path, keys: dict[bytes, bytes],
                 config_nodes: Mapping[str, NodeMeta], node_ids: list[str]) -> None:
        self.registry = registry
        self.keys_file = keys_file
        keys = registry.overlay(keys)  # a rotated key in place of the key file's
        self.ingest_keys = KeyView(keys, registry)
        # the links' keys stay whole: a link looks a node's key up where a missing one is a
        # bug (a BLE session, a command's reply); what a revoked node sends is refused at ingest
        self.link_keys: dict[bytes, bytes] = dict(keys)
        self.ops: LiveOps | None = None  # rotations and group settings, once attached
        self.config_nodes = config_nodes
        self.node_ids = node_ids  # the gateway's list of keyed nodes, extended in place
        self.nodes_meta: dict[str, NodeMeta] = {}  # registry places, [nodes] winning
        self._mtime = self._stat()
        self._db_stamp: tuple[tuple[int, int] | None, ...] = ()  # what the last read saw
        self._db_recent = True  # the file was fresh at the last read: read it once more
        self._observed: tuple[dict[str, float], dict[str, str], dict[str, Place]] | None = None
        self._refusals: dict[str, tuple[str | None, str | None]] = {}
        self._pushed: dict[str, tuple[object, ...]] = {}
        self._failing: set[str] = set()  # what is logged once until it works again

    def refused(self, kid: bytes) -> str | None:
        """Why ingest must refuse frames of `kid` now ("revoked", "retired"), or None: for an
        ingest that asks on every frame (its `refused` hook, when it has one)."""
        key = dict.get(self.ingest_keys, kid)
        return None if key is None else self.registry.refusal(kid.decode("utf-8", "replace"),
                                                             key)

    def attach(self, ingest: Any, links: list[Any], metrics: Any) -> LiveOps:
        """Give ingest the registry's hooks (its `refused` verdict, a rotating node's other
        key) and start the live operations over the links' command channels."""
        from .fleetops import FleetOps

        ingest.refused = self.refused
        self.ops = FleetOps(self, links, metrics, ingest.forget)
        ingest.other_key = self.ops.other_key
        return self.ops

    def _stat(self) -> float | None:
        try:
            return self.keys_file.stat().st_mtime_ns
        except OSError:
            return None

    def _registry_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        """(mtime, size) of the registry file and of its WAL: any writer, this process or
        `lantern gateway nodes ...`, changes one of them."""
        out: list[tuple[int, int] | None] = []
        for path in (self.registry.path, self.registry.path.with_name(
                self.registry.path.name + "-wal")):
            try:
                st = path.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    async def start(self) -> None:
        for line in await asyncio.to_thread(self.registry.sync_keys, dict(self.ingest_keys)):
            log.info("registry: %s", line)
        self._places()
        self._refusals = self._now_refused()
        for node, (why, _) in self._refusals.items():
            if why:
                log.warning("registry: node %s is %s: its frames are refused", node, why)

    def _places(self) -> None:
        for r in self.registry.records():
            self.nodes_meta[r.id] = self.config_nodes.get(r.id) or NodeMeta(
                pole=r.pole, lat=r.lat, lon=r.lon, interval_s=r.interval_s)
        for node, meta in self.config_nodes.items():
            self.nodes_meta[node] = meta
        for kid in self.ingest_keys:
            if kid.decode() not in self.node_ids:
                self.node_ids.append(kid.decode())

    def _now_refused(self) -> dict[str, tuple[str | None, str | None]]:
        out = {}
        for kid, key in dict.items(self.ingest_keys):
            node = kid.decode()
            r = self.registry.get(node)
            out[node] = (self.registry.refusal(node, key), r.key_id if r else None)
        return out

    def _once(self, what: str, e: BaseException | None) -> None:
        if e is None:
            if what in self._failing:
                self._failing.discard(what)
                log.info("registry: %s works again", what)
        elif what not in self._failing:
            self._failing.add(what)
            log.error("registry: %s failed (%s); tried again every %g s", what, e,
                      WATCH_EVERY_S)

    async def tick(self, seen: Mapping[str, float], firmware: Mapping[str, str],
                   forget: Callable[[bytes], None] | None, sinks: list[Any]) -> None:
        keys_read = False
        mtime = self._stat()
        if mtime != self._mtime:
            try:
                keys = await asyncio.to_thread(load_keys, self.keys_file)
                for line in await asyncio.to_thread(self.registry.sync_keys, keys):
                    log.info("registry: %s", line)
            except (ConfigError, sqlite3.Error) as e:
                self._once(f"reading {self.keys_file}", e)
            else:
                self._mtime = mtime
                keys_read = True
                self._once(f"reading {self.keys_file}", None)
                keys = self.registry.overlay(keys)
                self.ingest_keys.replace_all(keys)
                self.link_keys.clear()
                self.link_keys.update(keys)
        meta = {n: (m.pole, m.lat, m.lon, m.interval_s) for n, m in self.config_nodes.items()}
        learnt = (dict(seen), dict(firmware), meta)
        stamp = self._registry_stamp()
        if keys_read or learnt != self._observed or stamp != self._db_stamp or self._db_recent:
            # something to write, or the file changed: one hop to a thread; else none
            try:
                await asyncio.to_thread(self._sync, *learnt)
            except sqlite3.Error as e:
                self._once(f"writing {self.registry.path}", e)
            else:
                self._once(f"writing {self.registry.path}", None)
                self._observed, self._db_stamp = learnt, stamp
                newest = max((s[0] for s in stamp if s is not None), default=0)
                self._db_recent = time.time_ns() - newest < _RECENT_NS
        self._places()
        now_refused = self._now_refused()
        for node, state in now_refused.items():
            before = self._refusals.get(node)
            if before == state:
                continue
            why, kid = state
            if why:
                log.warning("registry: node %s: its frames are refused (%s)", node, why)
            else:  # a new node, a re-provisioned one or a rotation: expected, not a warning
                log.info("registry: node %s: key %s in use", node, kid)
            if before is not None and before[1] != kid:  # a new key: ingest reads it again
                if forget is not None:
                    forget(node.encode())
                else:
                    log.warning("registry: node %s: ingest keeps the key it read at the "
                                "node's first frame until the gateway restarts", node)
        self._refusals = now_refused
        if self.ops is not None:
            self.ops.heard(seen)
            self.ops.metrics.config_drift = self.ops.drift()
        await self._push(seen, sinks)

    def _sync(self, seen: Mapping[str, float], firmware: Mapping[str, str],
              meta: Mapping[str, Place]) -> None:
        """What the gateway learnt written, then the file read again if anyone changed it."""
        self.registry.observe(seen, firmware, meta)
        self.registry.refresh()

    async def _push(self, seen: Mapping[str, float], sinks: list[Any]) -> None:
        """Device entities of the records whose state, firmware, key or place changed."""
        pushers = [s for s in sinks if hasattr(s, "push_devices")]
        if not pushers:
            return
        now = time.time()
        recs = self.registry.live(seen)
        prints = {r.id: (r.state(now), r.firmware, r.key_id, r.lat, r.lon, r.board)
                  for r in recs}
        changed = [r for r in recs if self._pushed.get(r.id) != prints[r.id]]
        if not changed:
            return
        for sink in pushers:
            try:
                await sink.push_devices(changed, now)
            except Exception as e:  # the broker down, or refusing: tried at the next change
                self._once(f"Device entities to {sink.name}", e)
                return
            self._once(f"Device entities to {sink.name}", None)
        for r in changed:
            self._pushed[r.id] = prints[r.id]

    async def run(self, seen: Callable[[], Mapping[str, float]], firmware: Mapping[str, str],
                  forget: Callable[[bytes], None] | None, sinks: list[Any]) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                await self.tick(seen(), firmware, forget, sinks)
            except Exception as e:  # a bug of ours: said once, the gateway goes on
                self._once("the registry task", e)
